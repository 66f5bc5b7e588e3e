"""Shared wrapper around the onnxruntime-genai model builder.

The builder is run as a subprocess (``python -m onnxruntime_genai.models.builder``)
with a throw-away cache directory; afterwards the output folder is pruned to the
files the runtime needs and checked for completeness.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

PRECISIONS: tuple[str, ...] = ("int8", "int4")
REQUIRED_FILES: tuple[str, ...] = ("genai_config.json", "model.onnx", "tokenizer.json")
# Files the builder writes that the runtime does not need.
JUNK_FILES: tuple[str, ...] = ("special_tokens_map.json",)


class BuildError(RuntimeError):
    """Raised when the builder fails or its output folder is incomplete."""


def build(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    extra_options: Mapping[str, object] | None = None,
    *,
    quiet: bool = False,
) -> list[Path]:
    """Run the builder on the HF checkpoint ``hf_dir`` writing into ``out_dir``.

    ``extra_options`` become ``--extra_options key=value ...``. Returns the sorted
    list of files left in ``out_dir`` after pruning. Raises :class:`BuildError` if
    the builder exits non-zero (its output is included) or required files are missing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-agent-build-cache-") as cache:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf_dir),
            "-o",
            str(out_dir),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            cache,
        ]
        if extra_options:
            cmd.append("--extra_options")
            cmd += [f"{k}={_option_value(v)}" for k, v in extra_options.items()]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(
            f"builder failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    if not quiet:
        print(proc.stdout.strip()[-2000:])
    prune(out_dir)
    check_output(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def _option_value(value: object) -> str:
    """Render an extra-option value the way the builder's parser expects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def prune(out_dir: Path) -> None:
    """Remove builder leftovers (caches, unused tokenizer side files) from ``out_dir``."""
    for name in JUNK_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for child in out_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)


def check_output(out_dir: Path, required: Sequence[str] = REQUIRED_FILES) -> dict:
    """Check that ``out_dir`` is a usable model folder and return its genai config.

    Raises :class:`BuildError` if a required file is missing or empty.
    """
    missing = [n for n in required if not (out_dir / n).is_file() or (out_dir / n).stat().st_size == 0]
    if missing:
        raise BuildError(f"{out_dir}: missing or empty: {', '.join(missing)}")
    return json.loads((out_dir / "genai_config.json").read_text(encoding="utf-8"))


def set_eos(out_dir: Path, eos_ids: Sequence[int]) -> None:
    """Force ``model.eos_token_id`` in ``out_dir/genai_config.json`` to ``eos_ids``."""
    path = out_dir / "genai_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["model"]["eos_token_id"] = list(eos_ids)
    path.write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")


def describe(out_dir: Path) -> str:
    """Return a human-readable listing of the files in ``out_dir`` with sizes."""
    lines = []
    total = 0
    for p in sorted(out_dir.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            total += size
            lines.append(f"  {p.name:<24} {size:>10,d} B")
    lines.append(f"  {'total':<24} {total:>10,d} B")
    return "\n".join(lines)
