"""Over-the-air model updates: converge on the signed desired release, never end up without a model.

The desired release arrives as a retained manifest on the device's and the
group's ``model/desired`` topics (the device's wins).  The updater thread
checks it (``Manifest.check``), downloads the files into the store's staging
folder, verifies them, installs the version, loads it and runs its smoke test,
then switches to it *between jobs* on the worker thread (the running job ends
on the old model).  The first jobs on the new model are a probation: too many
failures and the agent goes back by itself.  Every phase is reported, retained,
on ``model/state``.

Which releases a box takes is decided in ``policy`` (versions ordered within a
model name, another name only when the release says it replaces the running
one).  What survives a crash: the store (see ``store``), partial downloads
(resumed), the update record (``record``: last status, probation, refused
releases).  At
start the agent serves the active version, or falls back to the previous one,
or to the configured model, whichever loads first.
"""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import logging
import platform
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import psutil

from agent import failpoints
from agent.engine.engine import Engine
from agent.engine.kv_choice import KvChoice, choose, release_kv_options
from agent.engine.kv_variants import variant_shapes
from agent.engine.memory_plan import MIN_CONTEXT, release_need
from agent.engine.options import EngineOptions
from agent.health.options import HealthThresholds
from agent.updates.install import download_and_install, files_on_disk, smoke_test
from agent.updates.options import UpdateConfig
from agent.updates.policy import Converged, Install, Refuse, RefusedBefore, Running, decide
from agent.updates.record import REMEMBERED, Probation, UpdateRecord
from agent.updates.store import ModelStore, Pointer
from edge_contract.errors import AgentError, DownloadError, ModelError, UpdateError
from edge_contract.manifest import FileKey, Manifest
from edge_contract.protocol import ErrorInfo, ModelRef, ModelState, UpdateErrorCode, UpdatePhase, UpdateStatus

log = logging.getLogger(__name__)

# Transient failures (network, a full disk that may be cleaned) are retried
# after this backoff, doubling: quick after a blip, at most every 10 minutes
# after a long outage.  Random jitter keeps a fleet from retrying in step.
_RETRY_FIRST_S = 2.0
_RETRY_MAX_S = 600.0
_RETRYABLE = frozenset({"download_interrupted", "disk_full"})

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


class _ModelSettings(Protocol):
    @property
    def path(self) -> Path: ...
    @property
    def name(self) -> str | None: ...
    @property
    def version(self) -> str | None: ...


class UpdaterConfig(Protocol):
    """What the updater reads of the box's configuration (``agent.config.AgentConfig`` is one).

    Declared here so that updates sit below the configuration that composes them.
    """

    @property
    def device_id(self) -> str: ...
    @property
    def state_dir(self) -> Path: ...
    @property
    def model(self) -> _ModelSettings: ...
    @property
    def engine(self) -> EngineOptions: ...
    @property
    def update(self) -> UpdateConfig: ...
    @property
    def health(self) -> HealthThresholds: ...


class Updater:
    """Owns the served model's lifecycle: start-up choice, updates, probation, rollback."""

    def __init__(
        self,
        config: UpdaterConfig,
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
        self._record: UpdateRecord = self.store.read_record()
        self._status: UpdateStatus | None = self._record.update
        # The configured model's files, hashed once per desired manifest of its name and version.
        self._configured_files: dict[str, frozenset[FileKey]] = {}
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

    def _engine(self, path: Path, *, beside: bool = False) -> Engine:
        """The engine of the model at ``path``, its KV cache and budgets chosen for this box (``_choice``).

        ``beside``: an update under test (no prefix cache on disk; see ``_choice``).
        """
        choice = self._choice(path, beside=beside)
        engine = Engine(
            path,
            choice.options,
            prefix_cache_dir=None if beside else self.config.state_dir / "prefix_cache",
            prepacked_dir=self.config.state_dir / "prepacked",
        )
        engine.kv_reason = choice.reason
        return engine

    def _choice(self, path: Path, *, beside: bool = False) -> KvChoice:
        """The engine options with the KV cache chosen and the unset budgets sized to this box's memory.

        ``kv_choice`` decides (``memory_plan`` sizes). Raises ``MemoryFitError`` naming the setting to
        change when the model cannot fit, ``ModelConfigError`` for a ``kv_cache`` the folder lacks.
        ``beside``: another model is loaded in this process (an update under test), whose
        memory the budgets may count on, since it is unloaded first when both do not fit.
        """
        available = psutil.virtual_memory().available
        if beside:
            available += psutil.Process().memory_info().rss
        budget = available - self.config.health.min_mem_available_mb * 2**20
        choice = choose(
            variant_shapes(path), self.config.engine, budget, machine=platform.machine(), name=path.name
        )
        options = choice.options
        log.info(
            "model %s: %s; expected peak %s; context %d tokens, prefix cache %d MiB, prefill chunk %d",
            path.name,
            choice.describe(),
            choice.peak.describe(),
            options.context_tokens,
            options.prefix_cache_mb,
            options.prefill_chunk_tokens,
        )
        if choice.warning is not None:
            log.warning("model %s: serving an %s", path.name, choice.warning)
        if (options.context_tokens or 0) < choice.shape.context_length and (
            "context_tokens" not in self.config.engine.model_fields_set
        ):
            log.warning(
                "model %s: context sized to %d of the model's %d tokens to fit this box's memory (%s)",
                path.name,
                options.context_tokens,
                choice.shape.context_length,
                choice.describe(),
            )
        return choice

    def _open(self, release: str | None) -> Serving:
        if release is None:
            engine = self._engine(self.config.model.path)
            name = self.config.model.name or engine.name
            return Serving(engine, ModelRef(name=name, version=self.config.model.version), None)
        manifest = self.store.manifest(release)
        if manifest is None:
            raise ModelError(f"{release} is not installed")
        engine = self._engine(self.store.path(release))
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
            probation = self._record.probation
            if probation is None or probation.release != self.serving.release:
                return
            probation.jobs += 1
            if not succeeded:
                probation.failures += 1
                probation.last_error = (error or "")[:200]
            over = probation.jobs >= self.settings.probation_jobs or time.time() > probation.until
            failed = probation.failures >= self.settings.max_failed_jobs
            if failed or over:
                self._record.probation = None
            self._save_record()
        if failed:
            message = f"{probation.failures} of its first {probation.jobs} jobs failed (last: {probation.last_error})"
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
            try:
                retry_in = self._converge_once()
            except Exception:  # nothing may end this thread: updates would stop for good
                log.exception("the updater failed; retrying")
                retry_in = _RETRY_FIRST_S
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
        with self._lock:
            refused = list(self._record.refused)
        decision = decide(
            manifest,
            running=self._running(manifest),
            installed=self.store.manifest(manifest.release_id),
            trusted=self._trusted,
            refused=refused,
            now=time.time(),
        )
        if isinstance(decision, Converged):
            log.debug("the desired release %s is the one running", manifest.release_id)
            return None
        if isinstance(decision, RefusedBefore):
            return None  # refused before: a new release is needed
        if isinstance(decision, Refuse):
            self._report_refusal(manifest, UpdateError(decision.message, code=decision.code))
            return None
        assert isinstance(decision, Install)
        too_large = self._memory_refusal(manifest)
        if too_large is not None:
            self._report_refusal(manifest, UpdateError(too_large, code="insufficient_memory"))
            return None
        try:
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
        except OSError as exc:
            # The box's storage, not the release: retried with backoff, never remembered.
            code: UpdateErrorCode = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "internal"
            log.warning("update to %s: storage: %s; retrying later", manifest.release_id, exc)
            self._set_status(manifest.release_id, "failed", error=(code, f"storage: {exc}"))
            return _RETRY_FIRST_S
        except Exception as exc:  # a bug must not stop updates for good, nor the agent
            log.exception("update to %s failed unexpectedly", manifest.release_id)
            self._report_refusal(manifest, UpdateError(f"{type(exc).__name__}: {exc}", code="internal"))
        return None

    def _memory_refusal(self, manifest: Manifest) -> str | None:
        """Why ``manifest``'s model cannot fit this box (before any download), or None when it can.

        The box's memory for it: what is available now plus what this process holds (the
        running model is unloaded first when both do not fit), less the health margin.
        """
        options = self.config.engine
        caches = release_kv_options(manifest.kv_bytes_per_token, manifest.kv_int8_bytes_per_token, options)
        need = min(release_need(manifest.memory_bytes, kv, options) for kv in caches.values())
        have = psutil.virtual_memory().available + psutil.Process().memory_info().rss
        have -= self.config.health.min_mem_available_mb * 2**20
        if need <= have:
            return None
        context = options.context_tokens or MIN_CONTEXT
        kv = " even with its int8 KV cache" if "int8" in caches else ""
        return (
            f"{manifest.release_id} needs ~{need >> 20} MiB{kv} (model {manifest.memory_bytes >> 20} MiB and "
            f"a {context}-token context) and this box has ~{max(0, have) >> 20} MiB for it: release a "
            "smaller model (or int4) for this box, or lower [engine] budgets"
        )

    def _running(self, manifest: Manifest) -> Running:
        """What runs, for ``policy.decide``; its files only when ``manifest`` has its name and version."""
        ref = self.serving.ref
        files = None
        if (manifest.name, manifest.version) == (ref.name, ref.version):
            if self.serving.release is not None:
                stored = self.store.manifest(self.serving.release)
                files = stored.file_keys if stored is not None else frozenset()
            else:
                files = self._configured_model_files(manifest)
        return Running(name=ref.name, version=ref.version, files=files)

    def _configured_model_files(self, manifest: Manifest) -> frozenset[FileKey]:
        """The configured model's files that ``manifest`` names, as they are on disk."""
        cached = self._configured_files.get(manifest.digest)
        if cached is not None:
            return cached
        try:
            found = files_on_disk(self.config.model.path, manifest)
        except (UpdateError, OSError) as exc:
            log.warning("cannot compare the configured model with %s: %s", manifest.release_id, exc)
            found = frozenset()
        self._configured_files = {manifest.digest: found}
        return self._configured_files[manifest.digest]

    def _apply(self, manifest: Manifest) -> None:
        release = manifest.release_id
        if self.store.manifest(release) is None:
            download_and_install(
                self.store,
                manifest,
                self.settings,
                min_free_bytes=self.config.health.min_disk_free_mb * 2**20,
                report=lambda phase, progress: self._set_status(release, phase, progress=progress),
                cancelled=lambda: self._stop.is_set() or self._superseded(),
            )
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

    def _superseded(self) -> bool:
        """Whether the desired release changed since this attempt began."""
        with self._lock:
            payload = self._desired.get("device") or self._desired.get("group")
        return payload != self._working_on

    def _load_and_test(self, path: Path, manifest: Manifest) -> Engine:
        try:
            engine = self._engine(path, beside=True)
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
            self._record.probation = Probation(release=release, until=time.time() + self.settings.probation_s)
            self._save_record()
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
        if manifest is not None and exc.code in REMEMBERED:
            self._remember_refused(manifest.digest)
        status = self._status
        if (
            status is not None
            and (f"{status.name}@{status.version}", status.phase) == (name, phase)
            and status.error is not None
            and (status.error.code, status.error.message) == (exc.code, exc.message[:500])
        ):
            # The same refusal again (one not remembered, re-offered at a reconnect; or another
            # manifest of the same release failing the same way): said already.
            log.debug("model update %s still refused: %s", name, exc.code)
            return
        log.error("model update %s %s: %s (%s)", name, phase, exc.message, exc.code)
        self._set_status(name, phase, error=(exc.code, exc.message))

    def _save_record(self) -> None:
        """Write the update record (the caller holds the lock); a storage error is logged, not raised."""
        try:
            self.store.write_record(self._record)
        except OSError as exc:
            # What is lost: at worst a remembered refusal or a probation count after a crash.
            log.warning("cannot write the update record %s: %s", self.store.record_file, exc)

    def _discard(self, release: str) -> None:
        """Delete a failed version, unless it is the active or previous one."""
        kept = (self.serving.release, self.store.pointer().previous)
        if release not in kept and self.store.manifest(release) is not None:
            self.store.remove(release)

    def _refuse_release(self, release: str) -> None:
        manifest = self.store.manifest(release)
        if manifest is not None:
            self._remember_refused(manifest.digest)

    def _remember_refused(self, digest: str) -> None:
        with self._lock:
            self._record.remember_refused(digest)
            self._save_record()

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
                self._record.update = status
                self._save_record()
        if self._started:
            self._publish(self.state())
