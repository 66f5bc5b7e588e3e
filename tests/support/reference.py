"""Greedy references computed on the architecture and kernels of the agent under test.

int4/int8 kernels give slightly different logits on each instruction set
(AVX-512, AVX2, Arm dot product), and the random-weight fixtures have
near-tied logits: greedy tokens of an x86 engine and an emulated aarch64 agent
may differ from the first token on.  So a test that checks what an agent
process (started with ``agent_python()``) generated compares it with a
reference computed by the same interpreter: this one in-process normally, the
emulated one (``EDGE_AGENT_TEST_PYTHON``) in its own process under
``.ci/arm64_emulated.sh``.  Only what holds across architectures (the prompt's
token count, the reply's shape) may be compared with the host's engine.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from agent.engine.engine import Completion, Engine
from agent.engine.sampling import SamplingParams
from tests.support.agent import agent_python

# Run by the agent's interpreter: the library path (Engine.generate), not the CLI or daemon under test.
_SCRIPT = """
import json, sys
from agent import Engine, SamplingParams
path, max_tokens, spec = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
engine = Engine(path)
ids = engine.prompt_ids(messages=spec["messages"]) if "messages" in spec else engine.prompt_ids(spec["prompt"])
print(engine.generate(ids, SamplingParams(max_tokens=max_tokens)).model_dump_json())
"""


def emulated() -> bool:
    """Whether the agent under test runs on another interpreter (the emulated aarch64 one)."""
    return bool(os.environ.get("EDGE_AGENT_TEST_PYTHON"))


@functools.lru_cache(maxsize=4)
def _engine(path: str) -> Engine:
    return Engine(path)


@functools.lru_cache(maxsize=64)
def _reference(path: str, spec_json: str, max_tokens: int) -> Completion:
    spec: dict[str, Any] = json.loads(spec_json)
    if not emulated():
        engine = _engine(path)
        ids = (
            engine.prompt_ids(messages=spec["messages"])
            if "messages" in spec
            else engine.prompt_ids(spec["prompt"])
        )
        return engine.generate(ids, SamplingParams(max_tokens=max_tokens))
    proc = subprocess.run(
        [*agent_python(), "-c", _SCRIPT, path, str(max_tokens), spec_json],
        capture_output=True,
        text=True,
        timeout=600,  # an emulated interpreter loads onnxruntime and the model slowly
        check=False,
    )
    assert proc.returncode == 0, f"reference generation failed on the agent's interpreter:\n{proc.stderr}"
    return Completion.model_validate_json(proc.stdout.strip().splitlines()[-1])


def greedy(
    model: Path, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None, max_tokens: int
) -> Completion:
    """The greedy completion the agent under test must produce for ``prompt`` (or chat ``messages``)."""
    spec = {"messages": messages} if messages is not None else {"prompt": prompt}
    return _reference(str(model), json.dumps(spec, sort_keys=True), max_tokens)
