"""The agent's exceptions: one tree, so callers can catch as broadly as they need.

    AgentError
    ├── ConfigError                the configuration file or environment is invalid (names the key)
    ├── LinkError                  the broker connection cannot be set up or used
    ├── StorageError               state_dir or the job database cannot be used (names the path and the fix)
    ├── ModelError                 the model folder cannot be used
    │   ├── ModelFileError         a file is missing, unreadable or corrupt (names the file)
    │   ├── ModelConfigError       genai_config.json is missing a field or has an unsupported one
    │   └── MemoryFitError         the model, with the budgets set, cannot fit the box's memory (names the setting)
    ├── GenerationError            a request cannot be run
    │   └── InvalidRequestError    the request itself is wrong: a parameter out of range, text that
    │       │                      is not Unicode, no chat template for messages (never the model's fault)
    │       └── ContextOverflowError   the prompt does not fit in the model's context
    └── UpdateError                a model update is refused or failed (``code`` says why)
        ├── SignatureError         a manifest's signature is missing, untrusted or wrong
        └── DownloadError          a download broke off (network, server): it resumes later

Foreign errors (onnxruntime, tokenizers, jinja2, json, cryptography, urllib) are translated once, where
they enter the agent, with ``raise ... from exc`` so the cause stays visible.
Every error carries a stable machine-readable ``code`` for wire replies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_contract.protocol import JobErrorCode, UpdateErrorCode


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""

    code = "config"


class LinkError(AgentError):
    """The broker connection cannot be set up or used."""

    code = "link"


class StorageError(AgentError):
    """``state_dir`` or the job database cannot be used; the message names the path and the fix."""

    code = "storage"


class ModelError(AgentError):
    """The model folder cannot be loaded."""

    code: JobErrorCode = "model_error"


class ModelFileError(ModelError):
    """A file of the model folder is missing, unreadable or corrupt."""

    code: JobErrorCode = "model_file"

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


class ModelConfigError(ModelError):
    """``genai_config.json`` lacks a field the engine needs, or names an unsupported one."""

    code: JobErrorCode = "model_config"


class MemoryFitError(ModelError):
    """The model with the configured budgets cannot fit the box's memory; the message names the setting."""

    code: JobErrorCode = "model_error"


class GenerationError(AgentError):
    """A generation request cannot be run as asked."""

    code: JobErrorCode = "generation_error"


class InvalidRequestError(GenerationError):
    """A request parameter is out of range or inconsistent."""

    code: JobErrorCode = "invalid_request"


class ContextOverflowError(InvalidRequestError):
    """The prompt (plus at least one new token) does not fit in the model's context."""

    code: JobErrorCode = "context_overflow"

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the model's context holds "
            f"{context_length} (prompt + at least 1 new token must fit)"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class UpdateError(AgentError):
    """A model update is refused or failed; ``code`` is the reason reported in the model state."""

    code: UpdateErrorCode = "update_failed"

    def __init__(self, message: str, *, code: UpdateErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class SignatureError(UpdateError):
    """A manifest's signature is missing, made by an untrusted key, or does not verify."""

    code: UpdateErrorCode = "bad_signature"


class DownloadError(UpdateError):
    """A download broke off or the server failed; what arrived is kept and the download resumes."""

    code: UpdateErrorCode = "download_interrupted"
