"""Whether a box takes a desired release: the updater's rules, apart from any I/O.

Versions are ordered within a model name.  A release of the model the box runs
must carry a higher version (or be a signed rollback release); a release of
another model name installs only when its signed ``replaces`` names the model
the box runs (``edge-fleet release --replace-model``), whatever its version.
The same name and version must mean the same files: a re-release with other
files is refused (``version_conflict``), never taken for what already runs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import cast

from agent.updates.record import REMEMBERED, UPDATE_CODES, UpdateCode
from edge_contract import signing
from edge_contract.errors import UpdateError
from edge_contract.manifest import FileKey, Manifest, SemVer


@dataclass(frozen=True)
class Running:
    """The model a box serves now, as the rules see it."""

    name: str
    version: str | None  # None: the configured model of unknown version (any version may follow)
    #: Its content, when a release of the same name and version is on offer (else not needed).
    files: frozenset[FileKey] | None = None


@dataclass(frozen=True)
class Converged:
    """The desired release is the one running: nothing to do, nothing to report."""


@dataclass(frozen=True)
class RefusedBefore:
    """This very manifest was refused before (remembered): wait for a new one, quietly."""


@dataclass(frozen=True)
class Install:
    """Download (unless installed), test and activate it."""


@dataclass(frozen=True)
class Refuse:
    """Refuse it with a code and a message that names the fix."""

    code: UpdateCode
    message: str

    @property
    def remembered(self) -> bool:
        """Whether this refusal is remembered by the manifest's digest (see ``record.REMEMBERED``)."""
        return self.code in REMEMBERED


Decision = Converged | RefusedBefore | Install | Refuse


def decide(
    manifest: Manifest,
    *,
    running: Running,
    installed: Manifest | None,
    trusted: list[signing.PublicKey],
    refused: Collection[str],
    now: float,
) -> Decision:
    """What to do with the desired ``manifest``.

    ``installed`` is the box's stored copy of the same name@version, if any;
    ``refused`` the digests of manifests refused before.
    """
    if manifest.digest in refused:
        return RefusedBefore()
    same_release = (manifest.name, manifest.version) == (running.name, running.version)
    if same_release and running.files == manifest.file_keys:
        return Converged()  # also when the configured model is the desired release
    try:
        manifest.check(trusted, now=now)
    except UpdateError as exc:
        return Refuse(_code(exc.code), exc.message)
    if same_release or (installed is not None and installed.file_keys != manifest.file_keys):
        where = "runs" if same_release else "is installed"
        return Refuse(
            "version_conflict",
            f"{manifest.release_id} {where} on this box with other files: the same name and version "
            "must mean the same files; release the new files under a new version",
        )
    if manifest.name != running.name:
        if running.name not in manifest.replaces:
            return Refuse(
                "other_model",
                f"this box runs {running.name}, and the release of {manifest.name} does not say it "
                f"replaces it; to switch models, sign a release that does "
                f"(edge-fleet release --replace-model {running.name})",
            )
        return Install()
    if running.version is not None and not manifest.rollback and manifest.semver <= SemVer(running.version):
        return Refuse(
            "downgrade",
            f"version {manifest.version} is not above the running {running.name}@{running.version}; going "
            "back needs a signed rollback release (edge-fleet rollback)",
        )
    return Install()


def _code(code: str) -> UpdateCode:
    return cast(UpdateCode, code) if code in UPDATE_CODES else "internal"
