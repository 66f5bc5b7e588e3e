"""Over-the-air model updates: converge on the signed desired release, never end up without a model.

The desired release arrives as a retained manifest on the device's and the
group's ``model/desired`` topics (the device's wins).  The updater thread
checks it (``Manifest.check``), downloads the files into the store's staging
folder, verifies them, installs the version, loads it and runs its smoke test,
then switches to it *between jobs* on the worker thread (the running job ends
on the old model).  The first jobs on the new model are a probation: too many
failures and the agent goes back by itself.  Every phase is reported, retained,
on ``model/state``.

What survives a crash: the store (see ``model_store``), partial downloads
(resumed), the update record (last status, probation, refused releases).  At
start the agent serves the active version, or falls back to the previous one,
or to the configured model, whichever loads first.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from agent import failpoints
from agent.config import AgentConfig
from agent.engine.engine import Engine
from agent.errors import AgentError, DownloadError, LinkError, ModelError, UpdateError
from agent.link.tls import client_context
from agent.protocol import ErrorInfo, ModelRef, ModelState, UpdateErrorCode, UpdatePhase, UpdateStatus
from agent.updates.download import RateLimit, fetch, sha256_file
from agent.updates.manifest import Manifest
from agent.updates.store import ModelStore, Pointer

log = logging.getLogger(__name__)

# Transient failures (network, a full disk that may be cleaned) are retried
# after this backoff, doubling: quick after a blip, at most every 10 minutes
# after a long outage.  Random jitter keeps a fleet from retrying in step.
_RETRY_FIRST_S = 2.0
_RETRY_MAX_S = 600.0
_RETRYABLE = frozenset({"download_interrupted", "disk_full"})
# Progress is published at most this often (a retained message per update).
_PROGRESS_EVERY_S = 1.0
# Refused releases remembered (by signature) so that a retained bad manifest is
# not retried at every reconnect.
_REMEMBER_REFUSED = 32

Source = Literal["device", "group"]


class _RolledBack(Exception):
    """The old model was unloaded for the new one, which failed: the old one serves again."""

    def __init__(self, cause: UpdateError) -> None:
        super().__init__(cause.message)
        self.cause = cause


@dataclass
class Serving:
    """The model the worker runs.  Only the worker thread replaces it."""

    engine: Engine
    ref: ModelRef
    release: str | None  # its id in the store; None: the configured model
    precision: str | None = None


def smoke_test(engine: Engine, manifest: Manifest) -> None:
    """Check the recorded tokens rank within ``top_k`` at every step (teacher-forced)."""
    test = manifest.smoke_test
    ids = engine.prompt_ids(test.prompt)
    if ids != test.prompt_ids:
        raise UpdateError(
            "smoke test: the tokenizer splits the prompt differently than at release",
            code="smoke_test_failed",
        )
    ranks = engine.token_ranks(ids, test.token_ids)
    bad = [(step, rank) for step, rank in enumerate(ranks) if rank >= test.top_k]
    if bad:
        step, rank = bad[0]
        raise UpdateError(
            f"smoke test: {len(bad)} of {len(ranks)} recorded tokens fall outside the top {test.top_k} "
            f"(first at step {step}, rank {rank})",
            code="smoke_test_failed",
        )


class Updater:
    """Owns the served model's lifecycle: start-up choice, updates, probation, rollback."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        publish: Callable[[ModelState], None],
        between_jobs: Callable[[Callable[[], None]], concurrent.futures.Future[None]],
    ) -> None:
        self.config = config
        self.settings = config.update
        self.store = ModelStore(config.state_dir / "models")
        self._publish = publish
        self._between_jobs = between_jobs
        self._trusted = self.settings.public_keys()
        self._lock = threading.Lock()  # guards _desired, _record and _status
        self._desired: dict[Source, bytes] = {}
        self._record: dict[str, Any] = self.store.read_record()
        status = self._record.get("update")
        self._status: UpdateStatus | None = UpdateStatus.model_validate(status) if status else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edge-agent-updater", daemon=True)
        self._started = False
        self._working_on: bytes | None = None
        self.serving = self._load_at_start()

    # -- start-up -----------------------------------------------------------------------

    def _load_at_start(self) -> Serving:
        pointer = self.store.pointer()
        candidates = list(dict.fromkeys([pointer.active, pointer.previous, None]))
        for release in candidates:
            try:
                serving = self._open(release)
            except ModelError as exc:
                if release is None:
                    raise  # the configured model itself is broken: nothing to serve
                log.error("installed model %s does not load: %s", release, exc)
                self._refuse_release(release)
                self._set_status(release, "rolled_back", error=("model_load", exc.message))
                continue
            if release != pointer.active:
                self.store.set_pointer(Pointer(active=release, previous=None))
            status = self._status
            if (
                status is not None
                and release == f"{status.name}@{status.version}"
                and status.phase != "active"
            ):
                # A crash right after the switch: the switch stands, and so does the probation.
                self._set_status(release, "active")
            return serving
        raise AssertionError("unreachable: the configured model either loads or raises")

    def _open(self, release: str | None) -> Serving:
        if release is None:
            engine = Engine(
                self.config.model.path,
                self.config.engine,
                prefix_cache_dir=self.config.state_dir / "prefix_cache",
            )
            return Serving(engine, ModelRef(name=engine.name, version=self.config.model.version), None)
        manifest = self.store.manifest(release)
        if manifest is None:
            raise ModelError(f"{release} is not installed")
        engine = Engine(
            self.store.path(release),
            self.config.engine,
            prefix_cache_dir=self.config.state_dir / "prefix_cache",
        )
        return Serving(
            engine, ModelRef(name=manifest.name, version=manifest.version), release, manifest.precision
        )

    # -- the intake's side ---------------------------------------------------------------------

    def start(self) -> None:
        """Start converging in the background (and publishing the state)."""
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step (a download resumes at the next start)."""
        self._stop.set()
        self._wake.set()

    def offer(self, source: Source, payload: bytes) -> None:
        """A desired-state message arrived (empty: the desired state was cleared)."""
        with self._lock:
            if payload:
                self._desired[source] = payload
            else:
                self._desired.pop(source, None)
        self._wake.set()

    def refuse_unread(self, reason: str) -> None:
        """A desired-state message too large to read: report it; the desired state stays as it was."""
        log.error("model update refused unread: %s", reason)
        self._set_status("?", "failed", error=("invalid_manifest", reason))

    def state(self) -> ModelState:
        """What to publish on ``model/state``."""
        previous = self.store.pointer().previous
        manifest = self.store.manifest(previous) if previous else None
        with self._lock:
            return ModelState(
                device_id=self.config.device_id,
                active=self.serving.ref,
                previous=ModelRef(name=manifest.name, version=manifest.version) if manifest else None,
                update=self._status,
            )

    # -- the worker's side: probation -------------------------------------------------------------

    def job_finished(self, succeeded: bool, error: str | None = None) -> None:
        """Count a job the engine ran (worker thread); may roll the model back."""
        with self._lock:
            probation = self._record.get("probation")
            if not probation or probation.get("release") != self.serving.release:
                return
            probation["jobs"] += 1
            if not succeeded:
                probation["failures"] += 1
                probation["last_error"] = (error or "")[:200]
            over = probation["jobs"] >= self.settings.probation_jobs or time.time() > probation["until"]
            failed = probation["failures"] >= self.settings.max_failed_jobs
            if failed or over:
                del self._record["probation"]
            self.store.write_record(self._record)
        if failed:
            message = (
                f"{probation['failures']} of its first {probation['jobs']} jobs failed "
                f"(last: {probation['last_error']})"
            )
            log.error("model %s on probation: %s; rolling back", self.serving.release, message)
            self._rollback("probation_failed", message)

    def _rollback(self, code: UpdateErrorCode, message: str) -> None:
        """Go back to the previous version (worker thread, between jobs)."""
        failed = self.serving
        pointer = self.store.pointer()
        assert failed.release is not None
        self._refuse_release(failed.release)
        del self.serving.engine
        gc.collect()
        try:
            self.serving = self._open(pointer.previous)
        except ModelError:
            self.serving = self._open(None)
        self.store.set_pointer(Pointer(active=self.serving.release, previous=None))
        self._set_status(failed.release, "rolled_back", error=(code, message))
        self._discard(failed.release)

    # -- the updater thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        delay = _RETRY_FIRST_S
        while not self._stop.is_set():
            retry_in = self._converge_once()
            if retry_in is None:
                delay = _RETRY_FIRST_S
                self._wake.wait()
            else:
                delay = min(_RETRY_MAX_S, max(delay, retry_in))
                self._wake.wait(random.uniform(0.75, 1.25) * delay)
                delay *= 2
            self._wake.clear()

    def _converge_once(self) -> float | None:
        """One attempt; returns seconds to wait before retrying, or None when there is nothing to do."""
        with self._lock:
            payload = self._desired.get("device") or self._desired.get("group")
        if payload is None or self._stop.is_set():
            return None
        self._working_on = payload
        try:
            manifest = Manifest.parse(payload)
        except UpdateError as exc:
            self._report_refusal(None, exc)
            return None
        if (manifest.name, manifest.version) == (self.serving.ref.name, self.serving.ref.version):
            # Converged (also when the configured model is the desired release).
            log.debug("the desired release %s is the one running", manifest.release_id)
            return None
        if manifest.signature in self._record.get("refused", []):
            return None  # refused before: a new release is needed
        try:
            manifest.check(self._trusted, active=self.serving.ref.version)
            self._apply(manifest)
        except _RolledBack as back:
            self._report_refusal(manifest, back.cause, phase="rolled_back")
            self._discard(manifest.release_id)
        except UpdateError as exc:
            if exc.code in _RETRYABLE:
                log.warning("update to %s: %s; retrying later", manifest.release_id, exc.message)
                # A broken connection leaves the download going; a full disk stops it until
                # space is freed (retried, since the operator cannot reach the box to say so).
                phase: UpdatePhase = "downloading" if isinstance(exc, DownloadError) else "failed"
                self._set_status(manifest.release_id, phase, error=(exc.code, exc.message))
                return _RETRY_FIRST_S
            self._report_refusal(manifest, exc)
            self._discard(manifest.release_id)
        except Exception as exc:  # a bug must not stop updates for good, nor the agent
            log.exception("update to %s failed unexpectedly", manifest.release_id)
            self._report_refusal(manifest, UpdateError(f"{type(exc).__name__}: {exc}", code="internal"))
        return None

    def _apply(self, manifest: Manifest) -> None:
        release = manifest.release_id
        if self.store.manifest(release) is None:
            staging = self.store.staging(manifest)
            self.store.discard_staging(keep=release)
            self._download(manifest, staging)
            self._set_status(release, "verifying", progress=0.0)
            for entry in manifest.files:
                digest, size = sha256_file(staging / entry.path)
                if (digest, size) != (entry.sha256, entry.size):
                    (staging / entry.path).unlink()
                    raise UpdateError(f"{entry.path}: changed on disk after download", code="sha256_mismatch")
            failpoints.hit("verifying")
            self.store.install(manifest)
        failpoints.hit("installed")
        self._set_status(release, "testing")
        path = self.store.path(release)
        available = psutil.virtual_memory().available
        both_fit = available - manifest.memory_bytes >= self.settings.memory_reserve_mb * 2**20
        detail = None
        if both_fit:
            engine = self._load_and_test(path, manifest)
            failpoints.hit("testing")
            self._on_worker(lambda: self._switch(manifest, engine))
        else:
            log.warning(
                "not enough memory for two models (%d MiB available, the new one needs %d MiB): "
                "unloading the old one first",
                available >> 20,
                manifest.memory_bytes >> 20,
            )
            started = time.monotonic()
            self._on_worker(lambda: self._replace_in_place(manifest, path))
            detail = (
                "not enough memory for both models: the old one was unloaded first "
                f"({time.monotonic() - started:.1f} s without service)"
            )
        self.store.collect_garbage(self.settings.keep_versions)
        log.info("now serving %s", release)
        self._set_status(release, "active", detail=detail)

    def _download(self, manifest: Manifest, staging: Path) -> None:
        release = manifest.release_id
        needed = sum(
            f.size - _have(staging / f.path) for f in manifest.files if not (staging / f.path).exists()
        )
        free = self.store.free_bytes()
        margin = self.config.health.min_disk_free_mb * 2**20
        if needed + margin > free:
            raise UpdateError(
                f"needs {needed >> 20} MiB plus {margin >> 20} MiB to spare; {free >> 20} MiB are free",
                code="disk_full",
            )
        total = max(1, manifest.total_bytes)
        done = 0
        last = 0.0
        crash_at = total // 2
        rate = RateLimit(self.settings.bandwidth_kbps * 1000) if self.settings.bandwidth_kbps else None
        try:
            context = client_context(self.settings.ca)  # TLS 1.2+, verified: as for the broker
        except LinkError as exc:
            raise UpdateError(f"[update] ca: {exc.message}", code="download_interrupted") from exc
        self._set_status(release, "downloading", progress=0.0)

        def on_bytes(count: int) -> None:
            nonlocal done, last
            done += count
            if done >= crash_at:
                failpoints.hit("downloading")
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                self._set_status(release, "downloading", progress=min(1.0, done / total))
            if self._stop.is_set() or self._superseded():
                raise DownloadError("the download was stopped (shutdown, or a new desired release)")

        for entry in manifest.files:
            dest = self.store.target(staging, entry.path)
            if dest.exists():
                on_bytes(entry.size)  # finished in an earlier run; verified below
                continue
            fetch(entry, dest, on_bytes=on_bytes, rate=rate, context=context)

    def _superseded(self) -> bool:
        """Whether the desired release changed since this attempt began."""
        with self._lock:
            payload = self._desired.get("device") or self._desired.get("group")
        return payload != self._working_on

    def _load_and_test(self, path: Path, manifest: Manifest) -> Engine:
        try:
            engine = Engine(path, self.config.engine)
        except ModelError as exc:
            raise UpdateError(f"the new model does not load: {exc.message}", code="model_load") from exc
        try:
            smoke_test(engine, manifest)
        except AgentError as exc:
            if isinstance(exc, UpdateError):
                raise
            raise UpdateError(f"smoke test: {exc.message}", code="smoke_test_failed") from exc
        return engine

    def _on_worker(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the worker thread between jobs, and wait for it (re-raising its error)."""
        future = self._between_jobs(task)
        while True:
            try:
                future.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                if self._stop.is_set():
                    future.cancel()
                    raise DownloadError(
                        "the agent is stopping; the update resumes at the next start"
                    ) from None

    # -- worker thread: switching ---------------------------------------------------------------------

    def _switch(self, manifest: Manifest, engine: Engine) -> None:
        release = manifest.release_id
        self._set_status(release, "activating")
        old = self.serving
        with self._lock:
            # Recorded before the pointer moves: a crash right after the switch still
            # finds the probation, and one before it finds a probation for a version
            # that is not active (ignored).
            self._record["probation"] = {
                "release": release,
                "until": time.time() + self.settings.probation_s,
                "jobs": 0,
                "failures": 0,
            }
            self.store.write_record(self._record)
        self.store.set_pointer(Pointer(active=release, previous=old.release))
        failpoints.hit("activating")
        self.serving = Serving(
            engine, ModelRef(name=manifest.name, version=manifest.version), release, manifest.precision
        )
        del old
        gc.collect()

    def _replace_in_place(self, manifest: Manifest, path: Path) -> None:
        old_release = self.serving.release
        del self.serving.engine
        gc.collect()
        try:
            engine = self._load_and_test(path, manifest)
        except UpdateError as exc:
            self.serving = self._open(old_release)  # it loaded before; a failure here is a real fault
            raise _RolledBack(exc) from exc
        failpoints.hit("testing")
        self._switch(manifest, engine)

    # -- reporting -------------------------------------------------------------------------------------

    def _report_refusal(
        self, manifest: Manifest | None, exc: UpdateError, *, phase: UpdatePhase = "failed"
    ) -> None:
        name = manifest.release_id if manifest else "?"
        log.error("model update %s %s: %s (%s)", name, phase, exc.message, exc.code)
        if manifest is not None:
            self._remember_refused(manifest.signature)
        self._set_status(name, phase, error=(exc.code, exc.message))

    def _discard(self, release: str) -> None:
        """Delete a failed version, unless it is the active or previous one."""
        kept = (self.serving.release, self.store.pointer().previous)
        if release not in kept and self.store.manifest(release) is not None:
            self.store.remove(release)

    def _refuse_release(self, release: str) -> None:
        manifest = self.store.manifest(release)
        if manifest is not None:
            self._remember_refused(manifest.signature)

    def _remember_refused(self, signature: str) -> None:
        with self._lock:
            refused = [s for s in self._record.get("refused", []) if s != signature]
            self._record["refused"] = [*refused, signature][-_REMEMBER_REFUSED:]
            self.store.write_record(self._record)

    def _set_status(
        self,
        release: str,
        phase: UpdatePhase,
        *,
        progress: float | None = None,
        detail: str | None = None,
        error: tuple[UpdateErrorCode, str] | None = None,
    ) -> None:
        name, _, version = release.partition("@")
        status = UpdateStatus(
            name=name,
            version=version or "?",
            phase=phase,
            progress=progress,
            detail=detail,
            error=ErrorInfo(code=error[0], message=error[1][:500]) if error else None,
        )
        with self._lock:
            self._status = status
            if phase != "downloading" or progress in (None, 0.0):  # progress ticks are not worth an fsync
                self._record["update"] = status.model_dump()
                self.store.write_record(self._record)
        if self._started:
            self._publish(self.state())


def _have(path: Path) -> int:
    part = path.with_name(path.name + ".part")
    return part.stat().st_size if part.exists() else 0
