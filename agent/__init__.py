"""edge-agent: run small language models on fleets of edge boxes.

The package is grouped by concept:

* ``agent.engine``: the inference engine (onnxruntime + tokenizers), sampling, streaming text;
* ``agent.jobs``: the durable job queue (SQLite);
* ``agent.updates``: signed releases, downloads, the model store and the updater;
* ``agent.health``: telemetry, system readings, systemd notification;
* ``agent.link``: the MQTT link and TLS;
* ``edge_contract.protocol``, ``agent.config``, ``edge_contract.errors``: the wire contract, the
  configuration and the exception tree (light leaves: none loads onnxruntime);
* ``agent.daemon``: the daemon that wires them together; ``agent.cli``, ``agent.doctor``.

The engine's names are re-exported here lazily, so importing a light leaf
(``edge_contract.protocol``, as ``edge-fleet`` does) never loads onnxruntime.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# onnxruntime on Linux reports usage telemetry unless this is set before it
# loads; a box in a factory must not phone anywhere it was not told to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from edge_contract.errors import (
    AgentError,
    ContextOverflowError,
    GenerationError,
    InvalidRequestError,
    ModelConfigError,
    ModelError,
    ModelFileError,
)

if TYPE_CHECKING:
    from agent.engine.engine import Completion, Engine
    from agent.engine.options import EngineOptions
    from edge_contract.params import SamplingParams
    from edge_contract.protocol import Timings

from edge_contract import __version__ as __version__

_LAZY = {
    "Completion": "agent.engine.engine",
    "Engine": "agent.engine.engine",
    "EngineOptions": "agent.engine.options",
    "Timings": "edge_contract.protocol",
    "SamplingParams": "edge_contract.params",
}


def __getattr__(name: str) -> Any:
    """Load the engine's names on first use (they pull in onnxruntime and numpy)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AgentError",
    "Completion",
    "ContextOverflowError",
    "Engine",
    "EngineOptions",
    "GenerationError",
    "InvalidRequestError",
    "ModelConfigError",
    "ModelError",
    "ModelFileError",
    "SamplingParams",
    "Timings",
    "__version__",
]
