"""Sampling parameters: their bounds, defined once, and the engine's ``SamplingParams``.

Each knob is an ``Annotated`` type carrying its bounds and its description.  The
wire schema (``edge_contract.protocol.JobRequest``), the configuration (``agent.config``)
and the command line (``agent.cli``) all use these types, so a bound changes in
one place.  The bounds are chosen so that every admitted value works: the
sampler (``agent.engine.sampling``) is property-tested over the whole range.

This module is a light leaf: it imports pydantic only (no numpy, no onnxruntime),
so the wire contract and ``edge-fleet`` can use it without loading the engine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError

#: Largest ``max_tokens`` anything accepts (a job's, and the config's ``max_tokens_limit``).
MAX_TOKENS_MAX = 131072
#: Temperatures between 0 and this are refused: they are greedy in all but name, and a value
#: like 5e-324 only invites overflow.  0 itself means greedy.
TEMPERATURE_MIN = 1e-3
TEMPERATURE_MAX = 5.0
#: A repetition penalty divides (or multiplies) the logits of seen tokens by at most 10 either way.
REPETITION_PENALTY_MIN = 0.1
REPETITION_PENALTY_MAX = 10.0
TOP_K_MAX = 1_000_000
SEED_MAX = 2**63 - 1
STOP_MAX = 16
STOP_LENGTH_MAX = 256


def _temperature_gap(value: float) -> float:
    if 0.0 < value < TEMPERATURE_MIN:
        raise ValueError(f"must be 0 (greedy) or between {TEMPERATURE_MIN} and {TEMPERATURE_MAX}")
    return value


MaxTokens = Annotated[
    int, Field(ge=1, le=MAX_TOKENS_MAX, description=f"Most new tokens to generate (1-{MAX_TOKENS_MAX}).")
]
Temperature = Annotated[
    float,
    Field(
        ge=0.0,
        le=TEMPERATURE_MAX,
        allow_inf_nan=False,
        description=(
            f"0 means greedy; otherwise {TEMPERATURE_MIN}-{TEMPERATURE_MAX}, higher flattens the distribution."
        ),
    ),
    AfterValidator(_temperature_gap),
]
TopK = Annotated[int, Field(ge=0, le=TOP_K_MAX, description="Keep the k likeliest tokens (0: all of them).")]
TopP = Annotated[
    float,
    Field(
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Keep the smallest set of likeliest tokens with this much probability (0-1, 1: all).",
    ),
]
RepetitionPenalty = Annotated[
    float,
    Field(
        ge=REPETITION_PENALTY_MIN,
        le=REPETITION_PENALTY_MAX,
        allow_inf_nan=False,
        description=(
            f"Divide the positive logits of tokens already seen by this, multiply the negative ones "
            f"({REPETITION_PENALTY_MIN}-{REPETITION_PENALTY_MAX}; 1: off, below 1 favours repeats)."
        ),
    ),
]
Seed = Annotated[
    int, Field(ge=0, le=SEED_MAX, description="Seed for reproducible sampling; random if unset.")
]
StopString = Annotated[str, Field(min_length=1, max_length=STOP_LENGTH_MAX)]

#: The same knobs for untrusted messages: strict, so ``"3"``, ``true`` or ``3.0`` are not integers
#: and ``"0.5"`` or ``true`` are not numbers.
WireMaxTokens = Annotated[MaxTokens, Strict()]
WireTemperature = Annotated[Temperature, Strict()]
WireTopK = Annotated[TopK, Strict()]
WireTopP = Annotated[TopP, Strict()]
WireRepetitionPenalty = Annotated[RepetitionPenalty, Strict()]
WireSeed = Annotated[Seed, Strict()]


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop: what the engine takes for one generation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens = 256
    temperature: Temperature = 0.0
    top_k: TopK = 0
    top_p: TopP = 1.0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Seed | None = None
    stop: tuple[StopString, ...] = Field(
        (), max_length=STOP_MAX, description="Strings that end generation; they are not part of the text."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the eos ids (benchmarks use this).")

    @property
    def greedy(self) -> bool:
        """True when the choice is the arg-max whatever the seed."""
        return self.temperature == 0.0 or self.top_k == 1


#: The defaults, for the wire schema and the command line to share.
DEFAULTS = SamplingParams()


def cli_type(annotated: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a flag's text as ``annotated``, with its bounds.

    A value out of range is an argparse error naming the flag and the bound, exactly as
    the wire schema would refuse it.
    """
    adapter: TypeAdapter[Any] = TypeAdapter(annotated)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise argparse.ArgumentTypeError(f"{text!r}: {reason}") from None

    return parse


def describe(annotated: Any) -> str:
    """The description an ``Annotated`` type carries (for ``--help``)."""
    for meta in getattr(annotated, "__metadata__", ()):
        description = getattr(meta, "description", None)
        if description:
            return str(description)
    return ""
