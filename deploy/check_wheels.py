"""Check that every runtime dependency installs on 64-bit Arm from wheels alone (no compiler).

    python deploy/check_wheels.py [--python-version 3.11]
    python deploy/check_wheels.py --target DIR [--with pytest ...]

Reads ``[project] dependencies`` from pyproject.toml and asks pip to download
them, and everything they pull in, as binary wheels for manylinux aarch64 —
what a Raspberry Pi OS (bookworm, glibc 2.36) box would install.  Exits
non-zero, naming the package, when any of them would need building from source.

With ``--target DIR`` pip installs them into DIR instead (still wheels only,
still for aarch64), together with the ``test`` extra's requirements named by
``--with``: the emulated aarch64 test run (``.ci/arm64_emulated.sh``) puts DIR
on an emulated interpreter's path and so proves that the wheels also load.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# glibc of Debian 12 / Raspberry Pi OS bookworm is 2.36: any of these tags installs there.
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


def _project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project


def _name(requirement: str) -> str:
    """The distribution name of a requirement string, normalized (PEP 503)."""
    head = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", head).lower()


def test_requirements(names: list[str]) -> list[str]:
    """The ``test`` extra's requirement strings for ``names``; an unknown name is an error."""
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    test = {_name(r): r for r in extras["test"]}
    missing = [n for n in names if _name(n) not in test]
    if missing:
        raise SystemExit(f"check_wheels: not in the test extra: {', '.join(missing)}")
    return [test[_name(n)] for n in names]


def _pip_platform_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def main(argv: list[str] | None = None) -> int:
    """Download (or, with --target, install) the runtime dependencies as aarch64 wheels; 0 when all exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--python-version", default="3.11")
    parser.add_argument("--target", type=Path, help="install the wheels into this folder")
    parser.add_argument(
        "--with",
        dest="also",
        action="append",
        default=[],
        metavar="NAME",
        help="also install this requirement of the test extra (with --target; repeatable)",
    )
    args = parser.parse_args(argv)
    deps = _project()["dependencies"]
    assert isinstance(deps, list)
    if args.target is not None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(args.target)]
        cmd += _pip_platform_args(args.python_version)
        proc = subprocess.run([*cmd, *deps, *test_requirements(args.also)], check=False)
        if proc.returncode != 0:
            print("check_wheels: the aarch64 wheels did not install (see above)", file=sys.stderr)
            return 1
        print(f"aarch64 wheels of all {len(deps)} runtime dependencies installed into {args.target}")
        return 0
    if args.also:
        parser.error("--with needs --target")
    with tempfile.TemporaryDirectory(prefix="aarch64-wheels-") as dest:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", dest]
        cmd += _pip_platform_args(args.python_version)
        proc = subprocess.run([*cmd, *deps], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            print("check_wheels: some runtime dependency has no aarch64 wheel (see above)", file=sys.stderr)
            return 1
        wheels = sorted(p.name for p in Path(dest).glob("*.whl"))
        others = sorted(p.name for p in Path(dest).iterdir() if p.suffix != ".whl")
    if others:
        print(f"check_wheels: not wheels: {', '.join(others)}", file=sys.stderr)
        return 1
    print(
        f"aarch64 wheels for all {len(deps)} runtime dependencies ({len(wheels)} wheels with what they pull in):"
    )
    for name in wheels:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
