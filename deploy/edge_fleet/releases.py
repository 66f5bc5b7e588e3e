"""Signed model releases: ``keygen`` and ``release``.

A release is a folder to serve over HTTP(S): the model's files and
``manifest.json`` (see ``edge_contract.manifest``); ``deploy`` (module ``deploy``)
makes it the desired state of a device or a group.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_contract import signing
from edge_contract.errors import UpdateError
from edge_contract.manifest import FileEntry, Manifest, SemVer, SmokeTest

from .errors import FleetError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's commands."""
    keygen = sub.add_parser("keygen", help="create the fleet's Ed25519 signing key pair")
    keygen.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes DIR/fleet.key and DIR/fleet.pub"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    keygen.set_defaults(func=keygen_command)

    release = sub.add_parser("release", help="hash, smoke-test and sign a model folder for serving")
    release.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    release.add_argument("--name", required=True, help="model name (e.g. phi3-mini)")
    release.add_argument("--version", required=True, help="semantic version, above what the boxes run")
    release.add_argument("--base-url", required=True, help="where DIR will be served (http:// or https://)")
    release.add_argument("--key", type=Path, required=True, metavar="PRIVATE_KEY", help="fleet.key")
    release.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="gets the files and manifest.json"
    )
    release.add_argument("--precision", help="int4, int8, … (shown in telemetry)")
    release.add_argument("--smoke-prompt", default="The device reports", help="prompt of the smoke test")
    release.add_argument("--smoke-tokens", type=int, default=16, help="greedy tokens recorded (default 16)")
    release.add_argument("--expires-days", type=float, default=30.0, help="boxes refuse it after this")
    release.add_argument("--force", action="store_true", help="replace an existing release in --out")
    add_replace_model(release)
    release.set_defaults(func=release_command)


def add_replace_model(parser: argparse.ArgumentParser) -> None:
    """``--replace-model NAME`` (release and rollback): an explicit, signed switch of model."""
    parser.add_argument(
        "--replace-model",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "boxes running model NAME may switch to this release (repeatable). Versions are ordered "
            "within a model name: without this, a box running another model refuses it (other_model)"
        ),
    )


def replaces_of(names: list[str], release_name: str) -> tuple[str, ...]:
    """The checked, de-duplicated ``replaces`` of a release named ``release_name``."""
    for name in names:
        if not _MODEL_NAME.fullmatch(name) or name == release_name:
            raise FleetError(
                f"--replace-model {name!r}: give the name of another model (1-64 of A-Z a-z 0-9 _ . -)"
            )
    return tuple(dict.fromkeys(names))


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


# -- keys -------------------------------------------------------------------------------------


def keygen_command(args: argparse.Namespace) -> int:
    """``edge-fleet keygen --out DIR``."""
    out: Path = args.out
    private_path, public_path = out / "fleet.key", out / "fleet.pub"
    if private_path.exists() and not args.force:
        raise FleetError(
            f"{private_path} exists; pass --force to replace it (boxes trusting it will refuse new releases)"
        )
    out.mkdir(parents=True, exist_ok=True)
    key = signing.generate()
    # Created 0600 from the start: the private key is never readable by others, even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signing.private_pem(key))
    os.chmod(private_path, 0o600)
    public = signing.PublicKey(key.public_key(), signing.key_id(key.public_key()))
    public_path.write_text(public.to_line() + "\n")
    print(f"wrote {private_path} (keep it secret) and {public_path}")
    print(f'add to each agent\'s config:\n[update]\ntrusted_keys = ["{public.to_line()}"]')
    return 0


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The fleet's signing key from ``path``."""
    return _private_key(path)


def _private_key(path: Path) -> Ed25519PrivateKey:
    try:
        return signing.load_private(path.read_bytes())
    except OSError as exc:
        raise FleetError(f"cannot read the key {path}: {exc}") from exc


# -- release ------------------------------------------------------------------------------------


def release_command(args: argparse.Namespace) -> int:
    """``edge-fleet release MODEL_DIR --name --version --base-url --key --out``."""
    manifest = build_release(
        args.model_dir,
        args.out,
        name=args.name,
        version=args.version,
        base_url=args.base_url,
        key=_private_key(args.key),
        precision=args.precision,
        smoke_prompt=args.smoke_prompt,
        smoke_tokens=args.smoke_tokens,
        expires_days=args.expires_days,
        force=args.force,
        replaces=args.replace_model,
    )
    print(
        f"release {manifest.release_id}: {len(manifest.files)} files, {manifest.total_bytes / 2**20:.1f} MiB, "
        f"~{manifest.memory_bytes / 2**20:.0f} MiB in memory, smoke test of "
        f"{len(manifest.smoke_test.token_ids)} tokens, signed by {manifest.key_id}\n"
        f"serve {args.out} at {args.base_url}; manifest: {args.out / 'manifest.json'}"
    )
    return 0


def build_release(
    source: Path,
    out: Path,
    *,
    name: str,
    version: str,
    base_url: str,
    key: Ed25519PrivateKey,
    precision: str | None = None,
    smoke_prompt: str = "The device reports",
    smoke_tokens: int = 16,
    expires_days: float = 30.0,
    force: bool = True,
    replaces: Sequence[str] = (),
) -> Manifest:
    """Copy ``source`` to ``out`` with a signed ``manifest.json``; returns the manifest.

    The release is built in a hidden folder beside ``out`` and renamed into place at the end: a
    failure leaves nothing behind.  An existing ``out`` is replaced only with ``force`` (the
    command line passes ``--force``, default off; scripts rebuilding a release keep the default).
    ``replaces``: other model names boxes may switch from to this release (signed)."""
    replacing = replaces_of(list(replaces), name)
    try:
        SemVer(version)
    except ValueError as exc:
        raise FleetError(str(exc)) from None
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise FleetError(f"--base-url must be http:// or https://, not {base_url!r}")
    files = _model_files(source)
    if out.resolve() == source.resolve():
        raise FleetError("--out must differ from MODEL_DIR")
    if out.exists() and any(out.iterdir()) and not force:
        what = "a release" if (out / "manifest.json").exists() else "files"
        raise FleetError(
            f"{out} already holds {what}: boxes may be downloading it; release a new version into a new "
            "folder, or pass --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _build(
            source,
            files,
            work,
            name,
            version,
            base_url,
            key,
            precision,
            smoke_prompt,
            smoke_tokens,
            expires_days,
            replacing,
        )
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _build(
    source: Path,
    files: list[str],
    out: Path,
    name: str,
    version: str,
    base_url: str,
    key: Ed25519PrivateKey,
    precision: str | None,
    smoke_prompt: str,
    smoke_tokens: int,
    expires_days: float,
    replacing: tuple[str, ...],
) -> Manifest:
    entries = _copy_and_hash(source, files, out, base_url.rstrip("/"))
    smoke, memory = _record_smoke_test(out, smoke_prompt, smoke_tokens)
    now = int(time.time())
    manifest = Manifest(
        name=name,
        version=version,
        replaces=replacing,
        precision=precision,
        files=entries,
        memory_bytes=memory,
        kv_bytes_per_token=_kv_bytes_per_token(out),
        kv_int8_bytes_per_token=_kv_int8_bytes_per_token(out),
        smoke_test=smoke,
        created_at=now,
        expires_at=now + int(expires_days * 86400),
        key_id="0" * 16,
    ).signed(key)
    manifest.check_paths()
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _kv_bytes_per_token(folder: Path) -> int:
    """The model's KV cache per token of context: boxes check a release fits before downloading it."""
    from agent.engine.memory_plan import model_shape

    return model_shape(folder).kv_bytes_per_token


def _kv_int8_bytes_per_token(folder: Path) -> int | None:
    """The same with the folder's int8 KV cache when it offers one beside its default graph, else None.

    Only for scales calibrated with the vocabulary sweep, which every box trusts: a box takes this
    figure for its pre-download check whatever its CPU (``agent.engine.kv_choice``).
    """
    from agent.engine.kv_choice import SWEPT
    from agent.engine.kv_variants import variant_shapes

    shapes = variant_shapes(folder)
    int8 = shapes.get("int8") if len(shapes) > 1 else None
    return int8.kv_bytes_per_token if int8 is not None and SWEPT in int8.kv_calibration else None


def _model_files(source: Path) -> list[str]:
    if not (source / "genai_config.json").is_file():
        raise FleetError(f"{source} is not a model folder (no genai_config.json)")
    files = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        if path.is_symlink():
            raise FleetError(f"{path} is a symlink: copy the file itself into the model folder")
        if path.is_file():
            files.append(relative)
    return files


def _copy_and_hash(source: Path, files: list[str], out: Path, base_url: str) -> list[FileEntry]:
    total = sum((source / f).stat().st_size for f in files)
    entries = []
    try:
        from tqdm import tqdm  # the operator's extra: boxes never run release
    except ImportError:
        raise FleetError(
            "edge-fleet release needs the fleet extra: pip install 'edge-agent[fleet]'"
        ) from None
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", disable=None) as bar:
        for relative in files:
            digest = hashlib.sha256()
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with (source / relative).open("rb") as src, target.open("wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                    bar.update(len(block))
            url = f"{base_url}/{urllib.parse.quote(relative)}"
            entries.append(
                FileEntry(path=relative, size=target.stat().st_size, sha256=digest.hexdigest(), url=url)
            )
    return entries


def _record_smoke_test(folder: Path, prompt: str, tokens: int) -> tuple[SmokeTest, int]:
    """Greedy tokens of the released files, and the memory loading and running them took."""
    # The engine loads onnxruntime, numpy and tokenizers: only this command needs them, so
    # every other edge-fleet command starts without (tests/unit/test_dependencies.py).
    from agent.engine.engine import Engine
    from agent.engine.sampling import SamplingParams

    process = psutil.Process()
    before = process.memory_info().rss
    engine = Engine(folder)
    ids = engine.prompt_ids(prompt)
    completion = engine.generate(ids, SamplingParams(max_tokens=tokens, ignore_eos=True))
    used = process.memory_info().rss - before
    # model.onnx and its external data (model.onnx.data), each counted once.
    weights = sum(p.stat().st_size for p in folder.rglob("*") if ".onnx" in p.name or p.suffix == ".data")
    return SmokeTest(prompt=prompt, prompt_ids=ids, token_ids=completion.token_ids), max(used, weights)


# -- deploy and rollback ---------------------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.parse(path.read_bytes())
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc}") from exc
    except UpdateError as exc:
        raise FleetError(f"{path}: {exc.message}") from exc


def read_deployable(path: Path) -> Manifest:
    """A manifest that boxes could accept: signed, not expired, every path inside its folder."""
    return check_deployable(read_manifest(path), str(path))


def check_deployable(manifest: Manifest, where: str) -> Manifest:
    """``manifest`` if boxes could accept it (signed, not expired, paths inside its folder); ``where``
    names it in the error."""
    if not manifest.signature:
        raise FleetError(f"{where} is not signed")
    if manifest.expires_at <= time.time():
        raise FleetError(f"{where} has expired: sign a new release")
    try:
        manifest.check_paths()
    except UpdateError as exc:
        raise FleetError(f"{where}: {exc.message}") from exc
    return manifest


def sign_rollback(
    earlier: Manifest, key: Ed25519PrivateKey, expires_days: float, replace_models: Sequence[str] = ()
) -> Manifest:
    """``earlier`` signed again as an explicit rollback release (boxes accept it below their version);
    ``replace_models``: models boxes may be running now, to switch back from (added to its ``replaces``)."""
    now = int(time.time())
    replaces = replaces_of([*earlier.replaces, *replace_models], earlier.name)
    return earlier.model_copy(
        update={
            "rollback": True,
            "replaces": replaces,
            "created_at": now,
            "expires_at": now + int(expires_days * 86400),
        }
    ).signed(key)
