"""What running a job came to, and whose fault a failure was (for a new model's probation)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from edge_contract.protocol import JobRequest, ModelRef, Result

if TYPE_CHECKING:
    from agent.engine.engine import Engine


class ServedModel(Protocol):
    """The model the worker runs now."""

    @property
    def engine(self) -> Engine: ...
    @property
    def ref(self) -> ModelRef: ...


class Models(Protocol):
    """Where the served model comes from (the ``Updater``) and where probation is counted."""

    @property
    def serving(self) -> ServedModel: ...

    def job_finished(self, succeeded: bool, error: str | None = None) -> None: ...


#: How a finished job counts towards a new model's probation.
Probation = Literal["success", "failure", "none"]


@dataclass(frozen=True)
class Outcome:
    """What ``run`` made of a job: its result and how it counts towards probation."""

    result: Result
    probation: Probation = "none"


def blame(exc: BaseException, request: JobRequest) -> Probation:
    """Whether an unexpected error in a job counts against the model.

    An error raised inside the sampler on a request with non-default sampling
    parameters is the request's doing (extreme temperatures or penalties): it
    fails that job but never rolls back a release.  Anything else unexpected
    (onnxruntime failing, a sampler error on plain greedy decoding) is the
    model's.
    """
    plain = request.temperature == 0.0 and request.repetition_penalty == 1.0
    in_sampler = any(
        frame.filename.replace("\\", "/").endswith("agent/engine/sampling.py")
        for frame in traceback.extract_tb(exc.__traceback__)
    )
    return "none" if in_sampler and not plain else "failure"
