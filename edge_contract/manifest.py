"""Release manifests: what a model update is, and the checks that decide whether to trust it.

An operator's ``edge-fleet release`` writes one ``Manifest`` per model version
and signs its canonical form with the fleet's Ed25519 key; the agent receives
it as the retained desired state and accepts it only when ``Manifest.check``
passes: a trusted signature, not expired, every file path inside the version
directory, and a version above the active one (unless it is an explicit,
signed rollback release).  Which releases a box takes over the model it runs
(versions are ordered within a model name; another name needs ``replaces``) is
decided in ``agent.updates.policy``.

The canonical form is the manifest without ``signature``, as JSON with sorted
keys, no spaces and UTF-8 text.  Every number in it is an integer (times are
whole Unix seconds), so any language can reproduce the bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from functools import total_ordering
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from edge_contract import signing
from edge_contract.errors import UpdateError

# Both matched with fullmatch: ``re.match(...$)`` would accept a trailing newline ("1.0.0\n").
_SEMVER = re.compile(
    r"(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: A manifest larger than this is refused unread.
MAX_MANIFEST_BYTES = 64 * 1024


@total_ordering
class SemVer:
    """A semantic version (2.0.0), ordered by its precedence rules; build metadata is ignored."""

    def __init__(self, text: str) -> None:
        found = _SEMVER.fullmatch(text)
        if found is None:
            raise ValueError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])")
        self.text = text
        self.core = (int(found[1]), int(found[2]), int(found[3]))
        self.pre: tuple[tuple[int, int | str], ...] = tuple(
            (0, int(part)) if part.isdigit() else (1, part) for part in (found[4] or "").split(".") if part
        )

    def _key(self) -> tuple[tuple[int, int, int], int, tuple[tuple[int, int | str], ...]]:
        # A release (no pre-release part) ranks above all of its pre-releases.
        return (self.core, 0 if self.pre else 1, self.pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


def _semver(value: str) -> str:
    SemVer(value)
    return value


class _Signed(BaseModel):
    # strict: the canonical form has only integers, so "3", 3.0 and true are not sizes or token ids.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Lower-case hex SHA-256.")]
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Model name.")]
#: What a file of a release is, whatever server it comes from: (path, size, sha256).
FileKey = tuple[str, int, str]


class FileEntry(_Signed):
    """One file of the model folder."""

    path: str = Field(min_length=1, max_length=512, description="Relative path inside the model folder.")
    size: int = Field(ge=0, le=1 << 40, description="Exact size in bytes; a download never reads more.")
    sha256: Sha256
    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://", description="HTTP(S) source.")


class SmokeTest(_Signed):
    """A prompt and the greedy tokens recorded at release, checked teacher-forced on the box."""

    prompt: str = Field(min_length=1, max_length=4096)
    prompt_ids: list[int] = Field(min_length=1, max_length=4096, description="Its tokenization at release.")
    token_ids: list[int] = Field(min_length=1, max_length=256, description="Greedy continuation at release.")
    top_k: int = Field(
        5,
        ge=1,
        le=100,
        description=(
            "Each recorded token must rank within the box's top_k at its step: CPUs differ in the last "
            "bits (an Arm core without dot-product instructions can flip a near-tie), a broken model "
            "does not rank the recorded tokens at all."
        ),
    )


class Manifest(_Signed):
    """A signed model release: the files, how to test them, and the signature."""

    format: Literal[1] = 1
    name: ModelName
    version: str = Field(
        max_length=64, description="Semantic version; must rise within the name unless rollback is set."
    )
    rollback: bool = Field(
        False, description="An explicit rollback release: may carry a version at or below the active one."
    )
    replaces: tuple[ModelName, ...] = Field(
        (),
        max_length=16,
        strict=False,  # a list is a tuple here too (JSON has only arrays)
        description=(
            "Other model names this release may replace on a box (an explicit, signed switch of model: "
            "edge-fleet release --replace-model). Omitted from the JSON, and so from the signed form, "
            "when empty, so manifests signed before the field existed still verify."
        ),
    )
    precision: str | None = Field(None, max_length=16, description="int4, int8, … (reported in telemetry).")
    files: list[FileEntry] = Field(min_length=1, max_length=256)
    memory_bytes: int = Field(
        ge=0, le=1 << 40, description="Memory the loaded model takes, measured at release."
    )
    kv_bytes_per_token: int | None = Field(
        None,
        ge=0,
        le=1 << 30,
        description=(
            "The model's KV cache bytes per token of context: with memory_bytes, what a box checks "
            "against its memory before downloading (agent.engine.memory_plan.release_need). Omitted "
            "from the JSON, and so from the signed form, when unknown: older manifests still verify."
        ),
    )
    kv_int8_bytes_per_token: int | None = Field(
        None,
        ge=0,
        le=1 << 30,
        description=(
            "The same with the folder's int8 KV cache, when it offers one beside its default graph "
            "calibrated with the vocabulary sweep (models.convert writes both; agent.engine.kv_choice): "
            "a box that may serve it checks the "
            "release against it too. Omitted from the JSON, and so from the signed form, when absent."
        ),
    )
    smoke_test: SmokeTest
    created_at: int = Field(ge=0, description="Unix time (seconds) of signing.")
    expires_at: int = Field(ge=0, description="Unix time after which boxes refuse to start installing it.")
    key_id: str = Field(
        pattern=r"^[0-9a-f]{16}$", description="Id of the signing key (see edge_contract.signing)."
    )
    signature: str = Field("", max_length=256, description="Base64 Ed25519 signature of the canonical form.")

    _version_ok = field_validator("version")(_semver)

    @model_serializer(mode="wrap")
    def _omit_empty_optionals(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not self.replaces:
            data.pop("replaces", None)
        if self.kv_bytes_per_token is None:
            data.pop("kv_bytes_per_token", None)
        if self.kv_int8_bytes_per_token is None:
            data.pop("kv_int8_bytes_per_token", None)
        return data

    @property
    def semver(self) -> SemVer:
        """The version, ordered."""
        return SemVer(self.version)

    @property
    def release_id(self) -> str:
        """``name@version``: the name of its directory in the model store."""
        return f"{self.name}@{self.version}"

    @property
    def total_bytes(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)

    @property
    def file_keys(self) -> frozenset[FileKey]:
        """The release's content: each file's path, size and hash (its URL aside)."""
        return frozenset((f.path, f.size, f.sha256) for f in self.files)

    @property
    def digest(self) -> str:
        """SHA-256 of the whole manifest, signature included, in canonical form (hex).

        What a refusal is remembered by: any edit of any field gives another digest, so a
        refused manifest never stands in for another one that merely shares its signature.
        """
        data = self.model_dump(mode="json")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def canonical(self) -> bytes:
        """The signed bytes: everything but ``signature``, sorted keys, no spaces, UTF-8."""
        data = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def signed(self, private: Ed25519PrivateKey) -> Manifest:
        """A copy signed with ``private`` (its ``key_id`` set to that key's)."""
        unsigned = self.model_copy(update={"key_id": signing.key_id(private.public_key()), "signature": ""})
        _key, signature = signing.sign(private, unsigned.canonical())
        return unsigned.model_copy(update={"signature": signature})

    @classmethod
    def parse(cls, payload: bytes) -> Manifest:
        """Parse an untrusted manifest; ``UpdateError`` (code ``invalid_manifest``) names what is wrong."""
        if len(payload) > MAX_MANIFEST_BYTES:
            raise UpdateError(
                f"manifest is {len(payload)} bytes; the limit is {MAX_MANIFEST_BYTES}",
                code="invalid_manifest",
            )
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise UpdateError(f"invalid manifest: {problems}", code="invalid_manifest") from exc

    def check(
        self, trusted: list[signing.PublicKey], *, active: str | None = None, now: float | None = None
    ) -> None:
        """Refuse (``UpdateError`` with a precise code) unless this manifest is trustworthy.

        A trusted signature, not expired, safe paths.  With ``active`` (the version of a model of
        the same name running now) also a version above it unless this is a rollback release; the
        agent's full rules across model names are ``agent.updates.policy.decide``.
        """
        if not self.signature:
            raise UpdateError("the manifest is not signed", code="bad_signature")
        signing.verify(trusted, self.key_id, self.signature, self.canonical())
        now = time.time() if now is None else now
        if self.expires_at <= now:
            raise UpdateError(
                f"the manifest expired at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(self.expires_at))}",
                code="expired",
            )
        self.check_paths()
        if active is not None and not self.rollback and self.semver <= SemVer(active):
            raise UpdateError(
                f"version {self.version} is not above the active {active}; going back needs a signed "
                "rollback release (edge-fleet rollback)",
                code="downgrade",
            )

    def check_paths(self) -> None:
        """Every file lands inside the version directory, once, and the folder has its config."""
        seen: set[str] = set()
        dirs: set[str] = set()
        for entry in self.files:
            path = PurePosixPath(entry.path)
            parts = entry.path.split("/")
            if path.is_absolute() or "\\" in entry.path or not all(_PATH_PART.fullmatch(p) for p in parts):
                raise UpdateError(
                    f"file path {entry.path!r} escapes the version directory or has unsafe characters",
                    code="unsafe_path",
                )
            parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
            if entry.path in seen or entry.path in dirs or parents & seen:
                raise UpdateError(
                    f"file path {entry.path!r} is listed twice, or both as a file and a folder",
                    code="unsafe_path",
                )
            seen.add(entry.path)
            dirs |= parents
        if "genai_config.json" not in seen:
            raise UpdateError("the release has no genai_config.json", code="invalid_manifest")
