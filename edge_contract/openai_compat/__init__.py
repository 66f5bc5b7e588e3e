"""OpenAI- and Ollama-compatible HTTP, mapped onto the job contract: pure functions, no I/O.

One translation, two users: the box's HTTP server (``agent.daemon.http``) and the
fleet server's gateway (``edge_fleet.server.gateway``).  ``requests`` maps request
bodies to ``Call`` (a job without its id); ``answers`` maps chunks and results to
the dialects' answers and job errors to HTTP statuses.  It imports only the
contract and the standard library (docs/http-api.md describes the behaviour).
"""

from __future__ import annotations

from edge_contract.openai_compat.answers import (
    SSE_DONE,
    ChunkTemplate,
    StreamWriter,
    created_at,
    error_body,
    error_for,
    ndjson,
    ollama_final,
    ollama_model,
    ollama_piece,
    openai_chunk,
    openai_model,
    openai_response,
    openai_usage_chunk,
    response_id,
    result_error,
    sse,
    stream_content_type,
    stream_end,
    stream_piece,
    whole_answer,
)
from edge_contract.openai_compat.requests import (
    ApiError,
    Call,
    Kind,
    bad_request,
    ollama_chat,
    ollama_error,
    ollama_generate,
    openai_chat,
    openai_completion,
    openai_error,
    serves,
)

__all__ = [
    "SSE_DONE",
    "ApiError",
    "Call",
    "ChunkTemplate",
    "Kind",
    "StreamWriter",
    "bad_request",
    "created_at",
    "error_body",
    "error_for",
    "ndjson",
    "ollama_chat",
    "ollama_error",
    "ollama_final",
    "ollama_generate",
    "ollama_model",
    "ollama_piece",
    "openai_chat",
    "openai_chunk",
    "openai_completion",
    "openai_error",
    "openai_model",
    "openai_response",
    "openai_usage_chunk",
    "response_id",
    "result_error",
    "serves",
    "sse",
    "stream_content_type",
    "stream_end",
    "stream_piece",
    "whole_answer",
]
