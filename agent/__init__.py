"""edge-agent: run small language models on fleets of edge boxes."""

import os

# onnxruntime on Linux reports usage telemetry unless this is set before it
# loads; a box in a factory must not phone anywhere it was not told to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .engine import Completion, Engine, EngineOptions, Timings
from .errors import (
    AgentError,
    ContextOverflowError,
    GenerationError,
    InvalidRequestError,
    ModelConfigError,
    ModelError,
    ModelFileError,
)
from .sampling import SamplingParams

__version__ = "0.1.0"

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
