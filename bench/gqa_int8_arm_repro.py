"""One GroupQueryAttention node with an int8 KV cache, run on identical inputs on two CPUs.

    python bench/gqa_int8_arm_repro.py make DIR [--quant PER_CHANNEL] [--reach 1.0]  (needs onnx)
    python bench/gqa_int8_arm_repro.py run DIR          (onnxruntime + numpy only: run it on each CPU)
    python bench/gqa_int8_arm_repro.py compare DIR/out-x86_64.npz DIR/out-aarch64.npz

``make`` writes ``DIR/model.onnx`` (the llama-int4 fixture's attention: 4 query heads, 2 KV
heads, head size 16, packed QKV, ``do_rotary`` 1, ``rotary_interleaved`` 0, scale 0.25,
``k/v_quant_type`` ``PER_CHANNEL`` int8) and ``DIR/inputs.npz``: a prompt pass of 5 rows
then a 1-row decode pass reading the int8 cache the first wrote, keys and values up to
``--reach`` times the scales' range (past 1, they are clamped); ``run`` runs it with the
CPU provider on this machine and writes ``DIR/out-<machine>.npz``; ``compare`` prints where
the int8 present_key/value bytes and the attention output differ between two runs, and
each against a numpy reference of what the kernel documents (rotary, ``round(x / scale)``
clamped to [-128, 127], every cache row read back through the scale, softmax in float),
and exits 1 if any int8 byte differs.  For aarch64 on an x86 host, run ``run`` with the
emulated python that ``.ci/arm64_emulated.sh --build-only`` prints.

Found with onnxruntime 1.32 (x86-64 AVX-512 VNNI vs emulated Cortex-A76), ``--reach`` 1 and
3: the same int8 bytes, outputs 2-6e-7 apart, both within 7e-7 of the reference: the int8
cache's accuracy failure on aarch64 was not this op (docs/memory.md, fifth round).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

NUM_HEADS, KV_HEADS, HEAD = 4, 2, 16
PROMPT, CONTEXT = 5, 32
SCALE = 0.25
PASSES = [(0, PROMPT), (PROMPT, 1)]  # (first row, rows): the prompt, then one decode row


def _rotary_tables(context: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    inv = 1.0 / (10000.0 ** (np.arange(0, HEAD, 2, dtype=np.float64) / HEAD))
    angles = np.arange(context, dtype=np.float64)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def make(out: Path, quant: str, seed: int, reach: float) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cos, sin = _rotary_tables(CONTEXT)
    # Per channel scales of a typical spread (a key's rotary pair shares its magnitude).
    k_abs = rng.uniform(0.5, 6.0, (KV_HEADS, HEAD)).astype(np.float32)
    v_abs = rng.uniform(0.2, 2.0, (KV_HEADS, HEAD)).astype(np.float32)
    if quant == "PER_TENSOR":
        k_scale = np.full((1,), k_abs.max() * 1.25 / 127, np.float32)
        v_scale = np.full((1,), v_abs.max() * 1.25 / 127, np.float32)
    else:
        k_scale = (k_abs * 1.25 / 127)[None, :, None, :].astype(np.float32)
        v_scale = (v_abs * 1.25 / 127)[None, :, None, :].astype(np.float32)
    width = (NUM_HEADS + 2 * KV_HEADS) * HEAD
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "", "", "past_key", "past_value", "seqlens_k", "total_sequence_length",
         "cos_cache", "sin_cache", "", "", "", "k_scale", "v_scale"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=NUM_HEADS, kv_num_heads=KV_HEADS, scale=SCALE, local_window_size=-1, softcap=0.0,
        do_rotary=1, rotary_interleaved=0,
        k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=8,
    )  # fmt: skip
    cache = ["batch", KV_HEADS, "past", HEAD]
    graph = helper.make_graph(
        [node],
        "gqa_int8",
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", "seq", width]),
            helper.make_tensor_value_info("past_key", TensorProto.INT8, cache),
            helper.make_tensor_value_info("past_value", TensorProto.INT8, cache),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch", 1]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", NUM_HEADS * HEAD]),
            helper.make_tensor_value_info(
                "present_key", TensorProto.INT8, ["batch", KV_HEADS, "total", HEAD]
            ),
            helper.make_tensor_value_info(
                "present_value", TensorProto.INT8, ["batch", KV_HEADS, "total", HEAD]
            ),
        ],
        [
            numpy_helper.from_array(cos, "cos_cache"),
            numpy_helper.from_array(sin, "sin_cache"),
            numpy_helper.from_array(k_scale, "k_scale"),
            numpy_helper.from_array(v_scale, "v_scale"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    # Queries/keys/values of the magnitudes the scales were made for (within the range, unclamped).
    query = np.empty((1, PROMPT + 1, width), np.float32)
    query[..., : NUM_HEADS * HEAD] = rng.normal(0, 2.0, (1, PROMPT + 1, NUM_HEADS * HEAD))
    k_part = reach * rng.uniform(-1, 1, (1, PROMPT + 1, KV_HEADS, HEAD)) * k_abs[None, None] / np.sqrt(2)
    v_part = reach * rng.uniform(-1, 1, (1, PROMPT + 1, KV_HEADS, HEAD)) * v_abs[None, None]
    query[..., NUM_HEADS * HEAD : (NUM_HEADS + KV_HEADS) * HEAD] = k_part.reshape(1, PROMPT + 1, -1)
    query[..., (NUM_HEADS + KV_HEADS) * HEAD :] = v_part.reshape(1, PROMPT + 1, -1)
    np.savez(out / "inputs.npz", query=query, cos=cos, sin=sin, k_scale=k_scale, v_scale=v_scale)


def run(folder: Path) -> Path:
    import onnxruntime as ort

    inputs = dict(np.load(folder / "inputs.npz"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    past_k = np.zeros((1, KV_HEADS, 0, HEAD), np.int8)
    past_v = np.zeros((1, KV_HEADS, 0, HEAD), np.int8)
    results: dict[str, npt.NDArray[np.generic]] = {}
    for index, (start, rows) in enumerate(PASSES):
        total = start + rows
        feed = {
            "query": inputs["query"][:, start:total],
            "past_key": past_k,
            "past_value": past_v,
            "seqlens_k": np.array([[total - 1]], np.int32),
            "total_sequence_length": np.array(total, np.int32),
        }
        output, past_k, past_v = session.run(None, feed)
        results[f"output{index}"], results[f"key{index}"], results[f"value{index}"] = output, past_k, past_v
    path = folder / f"out-{platform.machine()}.npz"
    np.savez(path, **results)
    print(f"{path}: onnxruntime {ort.__version__} on {platform.machine()}")
    return path


def reference(folder: Path) -> dict[str, npt.NDArray[np.float64]]:
    """What the kernel documents, in float64: rotary, int8 rounding, attention over the read-back cache."""
    inputs = dict(np.load(folder / "inputs.npz"))
    query, cos, sin = inputs["query"].astype(np.float64), inputs["cos"], inputs["sin"]
    ks = inputs["k_scale"].astype(np.float32)
    vs = inputs["v_scale"].astype(np.float32)
    ks = np.broadcast_to(ks.reshape(KV_HEADS, HEAD) if ks.size > 1 else ks.reshape(1, 1), (KV_HEADS, HEAD))
    vs = np.broadcast_to(vs.reshape(KV_HEADS, HEAD) if vs.size > 1 else vs.reshape(1, 1), (KV_HEADS, HEAD))
    seq = query.shape[1]
    q = query[0, :, : NUM_HEADS * HEAD].reshape(seq, NUM_HEADS, HEAD)
    k = query[0, :, NUM_HEADS * HEAD : (NUM_HEADS + KV_HEADS) * HEAD].reshape(seq, KV_HEADS, HEAD)
    v = query[0, :, (NUM_HEADS + KV_HEADS) * HEAD :].reshape(seq, KV_HEADS, HEAD)

    def rotate(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        half = HEAD // 2
        c, s = cos[:seq, None, :].astype(np.float64), sin[:seq, None, :].astype(np.float64)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    q, k = rotate(q), rotate(k)
    k8 = np.clip(np.round(k.astype(np.float32) / ks), -128, 127)
    v8 = np.clip(np.round(v.astype(np.float32) / vs), -128, 127)
    kd, vd = k8 * ks, v8 * vs
    out = np.zeros((seq, NUM_HEADS, HEAD))
    for h in range(NUM_HEADS):
        g = h // (NUM_HEADS // KV_HEADS)
        scores = SCALE * q[:, h] @ kd[:, g].T
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ vd[:, g]
    return {
        "output": out.reshape(seq, NUM_HEADS * HEAD),
        "key": k8.transpose(1, 0, 2),
        "value": v8.transpose(1, 0, 2),
        "key_float": k.transpose(1, 0, 2) / ks[:, None, :],
    }


def compare(a: Path, b: Path) -> int:
    """Print the differences of two runs' outputs (``out-*.npz`` of one folder); 1 if any int8 byte differs."""
    folder = a.parent
    ra, rb = dict(np.load(a)), dict(np.load(b))
    ref = reference(folder)
    bytes_differ = False
    for index, (start, rows) in enumerate(PASSES):
        total = start + rows
        for kind in ("key", "value"):
            xa, xb = ra[f"{kind}{index}"][0].astype(int), rb[f"{kind}{index}"][0].astype(int)
            want = ref[kind][:, :total].astype(int)
            bytes_differ = bytes_differ or bool((xa != xb).any())
            print(
                f"pass {index} present_{kind}: {a.stem} vs {b.stem}: {int((xa != xb).sum())} of {xa.size} bytes differ "
                f"(max {int(np.abs(xa - xb).max())}); vs reference: {int((xa != want).sum())} / "
                f"{int((xb != want).sum())}"
            )
            if kind == "key" and (xb != want).any():
                where = np.argwhere(xb != want)
                for h, t, c in where[:8]:
                    print(
                        f"    head {h} row {t} channel {c}: {a.stem} {xa[h, t, c]} {b.stem} {xb[h, t, c]} "
                        f"reference {want[h, t, c]} (key/scale {ref['key_float'][h, t, c]:.4f})"
                    )
        oa, ob = ra[f"output{index}"][0], rb[f"output{index}"][0]
        want_out = ref["output"][start:total]
        gap = float(np.abs(oa - ob).max())
        print(
            f"pass {index} output: max |{a.stem} - {b.stem}| {gap:.3g}; vs reference "
            f"{float(np.abs(oa - want_out).max()):.3g} / {float(np.abs(ob - want_out).max()):.3g}"
        )
    return 1 if bytes_differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make")
    p_make.add_argument("folder", type=Path)
    p_make.add_argument("--quant", default="PER_CHANNEL", choices=["PER_CHANNEL", "PER_TENSOR"])
    p_make.add_argument("--seed", type=int, default=0)
    p_make.add_argument("--reach", type=float, default=1.0, help="values up to this many calibrated ranges")
    p_run = sub.add_parser("run")
    p_run.add_argument("folder", type=Path)
    p_cmp = sub.add_parser("compare")
    p_cmp.add_argument("a", type=Path)
    p_cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "make":
        make(args.folder, args.quant, args.seed, args.reach)
        return 0
    if args.command == "run":
        run(args.folder)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
