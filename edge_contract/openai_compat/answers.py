"""Results and chunks (``edge_contract.protocol``) as the two HTTP dialects' answers: pure, no I/O.

OpenAI's objects and SSE events (``data: {...}`` ending ``data: [DONE]``), Ollama's
objects and NDJSON lines; ``error_for`` maps a job's error code to the HTTP status
and OpenAI's error fields.  Both users (the box's ``agent.daemon.http`` and the
fleet's gateway, ``edge_fleet.server.gateway``) answer through these functions.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

from edge_contract.openai_compat.requests import ApiError, Call, ollama_error, openai_error
from edge_contract.protocol import JobErrorCode, Result

# -- answers -------------------------------------------------------------------------------------


def _usage(result: Result) -> dict[str, Any]:
    usage = result.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def response_id(call: Call, job_id: str) -> str:
    """The id of an OpenAI answer."""
    return ("chatcmpl-" if call.kind == "chat" else "cmpl-") + job_id


def openai_response(call: Call, job_id: str, result: Result, created: int) -> dict[str, Any]:
    """The whole answer of a request with ``stream`` false."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
    if call.kind == "chat":
        choice["message"] = {"role": "assistant", "content": result.text}
        kind = "chat.completion"
    else:
        choice["text"] = result.text
        kind = "text_completion"
    return {
        "id": response_id(call, job_id),
        "object": kind,
        "created": created,
        "model": call.model,
        "choices": [choice],
        "usage": _usage(result),
    }


def openai_chunk(
    call: Call, job_id: str, created: int, text: str, *, first: bool = False, finish: str | None = None
) -> dict[str, Any]:
    """One SSE chunk: a piece of text, or (``finish``) the last one with the finish reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if call.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text
        choice["delta"] = delta
        kind = "chat.completion.chunk"
    else:
        choice["text"] = text
        kind = "text_completion"
    return {
        "id": response_id(call, job_id),
        "object": kind,
        "created": created,
        "model": call.model,
        "choices": [choice],
    }


class ChunkTemplate:
    """The SSE events of one streamed OpenAI answer, fast: the JSON around the text is built once.

    ``event(text)`` equals ``b"data: " + json.dumps(openai_chunk(call, job_id, created, text)) + b"\\n\\n"``
    for any non-empty ``text`` (a unit test checks it); a token costs one ``json.dumps`` of a string.
    """

    _MARKER = "\u0000text\u0000"

    def __init__(self, call: Call, job_id: str, created: int) -> None:
        whole = json.dumps(openai_chunk(call, job_id, created, self._MARKER))
        head, tail = whole.split(json.dumps(self._MARKER), 1)
        self._head = b"data: " + head.encode()
        self._tail = tail.encode() + b"\n\n"

    def event(self, text: str) -> bytes:
        return self._head + json.dumps(text).encode() + self._tail


def openai_usage_chunk(call: Call, job_id: str, created: int, result: Result) -> dict[str, Any]:
    """The chunk after the last one when ``stream_options.include_usage`` is set: no choices, the usage."""
    chunk = openai_chunk(call, job_id, created, "")
    chunk["choices"] = []
    chunk["usage"] = _usage(result)
    return chunk


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ollama_piece(call: Call, text: str) -> dict[str, Any]:
    """One NDJSON line of a streamed Ollama answer."""
    line: dict[str, Any] = {"model": call.model, "created_at": _now_rfc3339()}
    if call.kind == "ollama_chat":
        line["message"] = {"role": "assistant", "content": text}
    else:
        line["response"] = text
    line["done"] = False
    return line


def ollama_final(call: Call, result: Result | None, *, text: str = "") -> dict[str, Any]:
    """Ollama's last line (or its whole answer, with ``text``); ``result`` None: a load-only request."""
    line = ollama_piece(call, text)
    line["done"] = True
    if result is None:
        line["done_reason"] = "load"
        return line
    line["done_reason"] = result.finish_reason or "stop"
    timings = result.timings
    ns = 1_000_000
    line.update(
        {
            "total_duration": int(timings.total_ms * ns) if timings else 0,
            "load_duration": 0,
            "prompt_eval_count": result.usage.prompt_tokens,
            "prompt_eval_duration": int(timings.prefill_ms * ns) if timings else 0,
            "eval_count": result.usage.completion_tokens,
            "eval_duration": int(timings.decode_ms * ns) if timings else 0,
        }
    )
    return line


def created_at(ts: float | None = None) -> int:
    """OpenAI's ``created``: whole seconds."""
    return int(time.time() if ts is None else ts)


# -- errors of jobs --------------------------------------------------------------------------------

#: (HTTP status, OpenAI error type) of each job error code.
_STATUS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "duplicate_id": (400, "invalid_request_error"),
    "context_overflow": (400, "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "overloaded": (503, "server_error"),
    "expired": (503, "server_error"),
    "interrupted": (503, "server_error"),
    "canceled": (503, "server_error"),
}
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): ")


def error_for(
    call: Call | None, code: JobErrorCode | str, message: str, *, overloaded_retry_s: int
) -> ApiError:
    """The HTTP error for a job that ended with ``code`` (admission's or the worker's)."""
    status, kind = _STATUS.get(code, (500, "server_error"))
    names = call.names if call is not None else {}
    param = None
    found = _FIELD.match(message)
    if status == 400 and found:
        param = found.group(1)
        for contract, dialect in names.items():
            if param == contract or param.startswith(contract + "."):
                renamed = dialect + param[len(contract) :]
                message = renamed + message[len(param) :]
                param = renamed
                break
    if code == "context_overflow":
        param = "messages" if call is not None and "messages" in call.job else "prompt"
        code = "context_length_exceeded"
    retry = 1 if code == "busy" else overloaded_retry_s if status == 503 else None
    return ApiError(status, message, type=kind, code=str(code), param=param, retry_after=retry)


def result_error(call: Call | None, result: Result, *, overloaded_retry_s: int) -> ApiError:
    """The HTTP error for a result that is not ``succeeded``."""
    error = result.error
    code = error.code if error is not None else "internal"
    message = error.message if error is not None else f"the job ended {result.status}"
    return error_for(call, code, message, overloaded_retry_s=overloaded_retry_s)


# -- the wire: bodies, SSE events, NDJSON lines ---------------------------------------------------------

#: The last event of an OpenAI stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def ndjson(body: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(body).encode() + b"\n"


def error_body(call: Call | None, error: ApiError, *, dialect: str = "openai") -> dict[str, Any]:
    """The error in the dialect of ``call`` (or ``dialect`` when there is no call yet)."""
    return ollama_error(error) if (call.dialect if call else dialect) == "ollama" else openai_error(error)


def stream_content_type(call: Call) -> str:
    """SSE for OpenAI, NDJSON for Ollama."""
    return "text/event-stream" if call.dialect == "openai" else "application/x-ndjson"


def stream_piece(call: Call, job_id: str, created: int, text: str, *, first: bool) -> bytes:
    """One piece of streamed text, as the dialect writes it (``StreamWriter`` for many: faster)."""
    if call.dialect == "openai":
        return sse(openai_chunk(call, job_id, created, text, first=first))
    return ndjson(ollama_piece(call, text))


class StreamWriter:
    """The pieces of one streamed answer: OpenAI's from a ``ChunkTemplate`` (after the first, which
    also opens the assistant's turn), Ollama's NDJSON lines."""

    def __init__(self, call: Call, job_id: str, created: int) -> None:
        self.call = call
        self.job_id = job_id
        self.created = created
        self._template = ChunkTemplate(call, job_id, created) if call.dialect == "openai" else None

    def piece(self, text: str, *, first: bool) -> bytes:
        """One piece of text."""
        if self._template is None:
            return ndjson(ollama_piece(self.call, text))
        if first:
            return sse(openai_chunk(self.call, self.job_id, self.created, text, first=True))
        return self._template.event(text)


def stream_end(
    call: Call, job_id: str, created: int, outcome: Result | ApiError, *, first: bool
) -> list[bytes]:
    """The last events of a stream: the finish (and usage), or the error; then SSE's [DONE].

    ``outcome``: the succeeded result, or the error that ends the stream.
    """
    openai = call.dialect == "openai"
    out = []
    if isinstance(outcome, ApiError):
        out.append(sse(openai_error(outcome)) if openai else ndjson(ollama_error(outcome)))
    elif openai:
        if first:  # nothing was streamed (an empty answer): still open the assistant's turn
            out.append(sse(openai_chunk(call, job_id, created, "", first=True)))
        out.append(sse(openai_chunk(call, job_id, created, "", finish=outcome.finish_reason)))
        if call.include_usage:
            out.append(sse(openai_usage_chunk(call, job_id, created, outcome)))
    else:
        out.append(ndjson(ollama_final(call, outcome)))
    if openai:
        out.append(SSE_DONE)
    return out


def whole_answer(call: Call, job_id: str, result: Result, created: int) -> dict[str, Any]:
    """The answer of a request with ``stream`` false, in its dialect."""
    if call.dialect == "openai":
        return openai_response(call, job_id, result, created)
    return ollama_final(call, result, text=result.text)


# -- model lists ----------------------------------------------------------------------------------------


def openai_model(name: str, created: int, owned_by: str) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def ollama_model(name: str, modified: int) -> dict[str, Any]:
    """One entry of ``GET /api/tags`` (``name`` as it is to be asked for)."""
    return {
        "name": name,
        "model": name,
        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(modified)),
        "size": 0,
        "digest": "",
        "details": {"format": "onnx", "family": "", "parameter_size": "", "quantization_level": ""},
    }
