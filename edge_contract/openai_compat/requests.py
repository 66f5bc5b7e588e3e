"""The two HTTP dialects' requests, mapped onto the job contract: pure functions, no I/O.

A request body (OpenAI's ``/v1/chat/completions`` and ``/v1/completions``,
Ollama's ``/api/chat`` and ``/api/generate``) becomes a ``Call``: the JSON
object of a ``JobRequest`` (without its id) plus how to answer.  The mapping
checks only what the job contract cannot express (``n`` must be 1, no tools,
text-only message parts, the model's name); every field the contract has
(``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, the messages) is
copied as given, so the intake's admission checks it exactly as it checks an
MQTT job, and its message names the field (``error_for`` translates the name
back to the dialect's, e.g. ``options.num_predict`` for Ollama's ``max_tokens``).
Unknown fields of a request are ignored, as OpenAI's and Ollama's servers do.

Defaults are the job contract's, not OpenAI's: greedy (``temperature`` 0) and
``max_tokens`` 256 when not given (see docs/http-api.md).

Errors: ``ApiError`` carries the HTTP status and OpenAI's error fields;
``openai_error`` and ``ollama_error`` give each dialect's body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["chat", "completion", "ollama_chat", "ollama_generate"]


class ApiError(Exception):
    """An HTTP error answer: status, message, and OpenAI's ``type``, ``code`` and ``param``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after


def bad_request(param: str | None, message: str, code: str = "invalid_request") -> ApiError:
    """A 400 naming ``param`` (the message starts with it, as the intake's messages do)."""
    text = f"{param}: {message}" if param else message
    return ApiError(400, text, code=code, param=param)


def openai_error(error: ApiError) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": error.message, "type": error.type, "code": error.code, "param": error.param}}


def ollama_error(error: ApiError) -> dict[str, Any]:
    """Ollama's error body."""
    return {"error": error.message}


@dataclass(frozen=True)
class Call:
    """One HTTP request, mapped: the job's JSON object (no id yet) and how to answer it."""

    kind: Kind
    model: str  # as the client named it, echoed in the answer
    job: dict[str, Any]
    stream: bool
    include_usage: bool = False  # OpenAI's stream_options.include_usage
    load_only: bool = False  # Ollama's /api/generate with an empty prompt: "load the model", no job
    names: dict[str, str] = field(default_factory=dict)  # contract field -> the dialect's name

    @property
    def dialect(self) -> Literal["openai", "ollama"]:
        return "ollama" if self.kind.startswith("ollama") else "openai"


# -- requests --------------------------------------------------------------------------------


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model", "required: the name of the served model (GET /v1/models lists it)")
    return model


def _stream(body: dict[str, Any], default: bool) -> bool:
    stream = body.get("stream", default)
    if stream is None:
        return default
    if not isinstance(stream, bool):
        raise bad_request("stream", "must be true or false")
    return stream


def _refuse_set(body: dict[str, Any], names: tuple[str, ...], why: str) -> None:
    """A 400 naming the first of ``names`` given a value that means something (not null, false, 0 or empty)."""
    for name in names:
        value = body.get(name)
        if value not in (None, False, 0, "", [], {}):
            raise bad_request(name, why)


def _stop(value: Any) -> Any:
    """OpenAI and Ollama take one stop string or a list; the contract takes a list."""
    return [value] if isinstance(value, str) else value


def _text_content(content: Any, where: str) -> Any:
    """A message's content: a string, or OpenAI's list of parts of which only text ones are served."""
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(
                    f"{where}.content.{index}", "only text parts ({'type': 'text', 'text': ...}) are served"
                )
            texts.append(part["text"])
        return "".join(texts)
    return content  # a string, or anything else for the contract to refuse naming the field


_ROLES = {"developer": "system", "function": "tool"}


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "required: a non-empty list of {role, content}")
    out: list[Any] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages.{index}", "must be an object {role, content}")
        if message.get("images"):
            raise bad_request(f"messages.{index}.images", "images are not served (a text model)")
        if message.get("tool_calls"):
            raise bad_request(f"messages.{index}.tool_calls", "tool calls are not served")
        role = message.get("role")
        out.append(
            {
                "role": _ROLES.get(role, role) if isinstance(role, str) else role,
                "content": _text_content(message.get("content"), f"messages.{index}"),
            }
        )
    return out


def _knobs(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: body[name] for name in names if body.get(name) is not None}


def _openai_common(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", "only n = 1 is served")
    _refuse_set(body, ("tools", "functions", "tool_choice", "function_call"), "tools are not served")
    _refuse_set(body, ("logprobs", "top_logprobs", "logit_bias"), "log probabilities are not served")
    _refuse_set(body, ("presence_penalty", "frequency_penalty"), "not served (0 only)")
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of", "only best_of = 1 is served")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise bad_request("response_format", "only {'type': 'text'} is served")
    job = _knobs(body, ("temperature", "top_p", "seed"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        job["max_tokens"] = max_tokens
    if body.get("stop") is not None:
        job["stop"] = _stop(body["stop"])
    stream = _stream(body, False)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    job["stream"] = stream
    return job, stream, include_usage


def openai_chat(body: Any) -> Call:
    """``POST /v1/chat/completions``."""
    body = _object(body)
    model = _model(body)
    job, stream, include_usage = _openai_common(body)
    job["messages"] = _messages(body)
    return Call("chat", model, job, stream, include_usage)


def openai_completion(body: Any) -> Call:
    """``POST /v1/completions``: the prompt as is, no chat template."""
    body = _object(body)
    model = _model(body)
    _refuse_set(body, ("echo", "suffix"), "not served")
    job, stream, include_usage = _openai_common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt", "required: one string (lists of prompts and token ids are not served)")
    job["prompt"] = prompt
    return Call("completion", model, job, stream, include_usage)


#: Ollama's options and the contract's fields they set (other options are ignored, as Ollama does).
_OLLAMA_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
}


def _ollama_options(body: dict[str, Any], max_tokens_limit: int) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_request("options", "must be an object")
    _refuse_set(body, ("format",), "structured output is not served")
    _refuse_set(body, ("tools",), "tools are not served")
    job: dict[str, Any] = {}
    for name, target in _OLLAMA_OPTIONS.items():
        value = options.get(name)
        if value is None:
            continue
        if name == "num_predict" and value in (-1, -2):  # Ollama: "until the end" -> the agent's limit
            value = max_tokens_limit
        job[target] = _stop(value) if name == "stop" else value
    return job


_OLLAMA_NAMES = {target: f"options.{name}" for name, target in _OLLAMA_OPTIONS.items()}


def ollama_chat(body: Any, max_tokens_limit: int) -> Call:
    """``POST /api/chat``: NDJSON stream unless ``"stream": false``."""
    body = _object(body)
    model = _model(body)
    stream = _stream(body, True)
    job = _ollama_options(body, max_tokens_limit)
    job["messages"] = _messages(body)
    job["stream"] = stream
    return Call("ollama_chat", model, job, stream, names=_OLLAMA_NAMES)


def ollama_generate(body: Any, max_tokens_limit: int) -> Call:
    """``POST /api/generate``: the prompt in the chat template (``"raw": true``: as is)."""
    body = _object(body)
    model = _model(body)
    stream = _stream(body, True)
    _refuse_set(body, ("images",), "images are not served (a text model)")
    _refuse_set(body, ("suffix",), "not served")
    _refuse_set(body, ("template",), "the model's own chat template is used; send raw = true to bypass it")
    job = _ollama_options(body, max_tokens_limit)
    prompt = body.get("prompt")
    if prompt is None or prompt == "":
        return Call("ollama_generate", model, job, stream, load_only=True, names=_OLLAMA_NAMES)
    raw = body.get("raw", False)
    if not isinstance(raw, bool):
        raise bad_request("raw", "must be true or false")
    system = body.get("system")
    if raw:
        job["prompt"] = prompt
    else:
        messages: list[Any] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        job["messages"] = messages
    job["stream"] = stream
    if system:
        names = {**_OLLAMA_NAMES, "messages.0.content": "system", "messages.1.content": "prompt"}
    else:
        names = {**_OLLAMA_NAMES, "messages.0.content": "prompt"}
    return Call("ollama_generate", model, job, stream, names=names)


def serves(requested: str, served: str) -> bool:
    """Whether the model a request names is the served one (Ollama's ``name:latest`` included)."""
    return requested == served or requested == f"{served}:latest"
