"""Building a job's terminal result and the one log line each job gets."""

from __future__ import annotations

import logging

from edge_contract.protocol import ErrorInfo, JobErrorCode, JobStatus, ModelRef, Result

log = logging.getLogger("agent.daemon.jobs")


def error_result(
    job_id: str,
    status: JobStatus,
    code: JobErrorCode,
    message: str,
    *,
    model: ModelRef | None,
    device_id: str,
) -> Result:
    """A result without text: the job did not succeed, ``code`` says why."""
    return Result(
        id=job_id,
        status=status,
        model=model,
        device_id=device_id,
        error=ErrorInfo(code=code, message=message),
    )


def log_job(result: Result, elapsed_s: float | None) -> None:
    """One INFO line per job: id, status, tokens and milliseconds from receipt (and the error, if any)."""
    usage = result.usage
    why = f" ({result.error.code}: {result.error.message})" if result.error is not None else ""
    ms = "-" if elapsed_s is None else f"{max(0.0, elapsed_s) * 1e3:.0f}"
    log.info(
        "job %s %s: %d prompt + %d completion tokens, %s ms%s",
        result.id,
        result.status,
        usage.prompt_tokens,
        usage.completion_tokens,
        ms,
        why,
    )
