"""Check that every runtime dependency installs on 64-bit Arm from wheels alone (no compiler).

    python deploy/check_wheels.py [--python-version 3.11]

Reads ``[project] dependencies`` from pyproject.toml and asks pip to download
them, and everything they pull in, as binary wheels for manylinux aarch64 —
what a Raspberry Pi OS (bookworm, glibc 2.36) box would install.  Exits
non-zero, naming the package, when any of them would need building from source.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# glibc of Debian 12 / Raspberry Pi OS bookworm is 2.36: any of these tags installs there.
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


def main(argv: list[str] | None = None) -> int:
    """Download the runtime dependencies as aarch64 wheels; 0 when all exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--python-version", default="3.11")
    args = parser.parse_args(argv)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    with tempfile.TemporaryDirectory(prefix="aarch64-wheels-") as dest:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", dest]
        cmd += ["--python-version", args.python_version, "--implementation", "cp"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
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
