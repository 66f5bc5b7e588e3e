"""Which MatMulNBits settings round a row differently by pass size on this CPU (a probe, not a test).

Builds single ``MatMulNBits`` nodes (random weights, symmetric, block 32 or ``--block``) and
compares each row of passes of 1..17 rows with the same row computed in a
two-row pass.  ``=`` means bit-identical.  Run it natively and under emulation:

    python bench/kernel_rows.py [--block 32]
    QEMU_CPU=Haswell-noTSX qemu-x86_64-static .venv/bin/python bench/kernel_rows.py   # AVX2-only

What it printed on onnxruntime 1.32 (docs/engine.md): on AVX-512 VNNI every row
of every pass agrees for int4 and int8 at ``accuracy_level`` 4; on AVX2 the
one-row pass of int4 differs (MLAS's M1 kernel, up to ~7e-6 at K = 3072) while
passes of two or more rows agree whatever their size; with float activations
(``accuracy_level`` 0/1) one row differs on both.  At ``--block 64`` and up on AVX-512 VNNI
(int4 and int8) rows are computed in pairs: a pass's unpaired row (the one row of a one-row pass,
the last of an odd one) differs, up to ~2e-6 (int4) and ~5e-5 (int8) at K = 3072.  Needs ``onnx`` (the test extra).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(k: int, n: int, bits: int, accuracy: int, block: int = 32) -> ort.InferenceSession:
    """One MatMulNBits node, ``[M, k] x [k, n]``, random quantized weights."""
    rng = np.random.default_rng(0)
    blocks = k // block
    weights = rng.integers(0, 256, size=(n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "S"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy,
    )
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weights, "B"), numpy_helper.from_array(scales, "S")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--block", type=int, default=32, help="weights per scale (shapes it does not divide are skipped)"
    )
    block = parser.parse_args().block
    print(f"onnxruntime {ort.__version__}, block {block}")
    for k, n, bits, accuracy in [
        (64, 128, 4, 4),
        (3072, 256, 4, 4),
        (64, 128, 8, 4),
        (3072, 256, 8, 4),
        (64, 128, 4, 0),
    ]:
        if k % block:
            continue
        run = session(k, n, bits, accuracy, block)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((17, k), dtype=np.float32)
        partner = rng.standard_normal((1, k), dtype=np.float32)
        two = np.stack(
            [run.run(None, {"A": np.concatenate([x[i : i + 1], partner])})[0][0] for i in range(17)]
        )
        one = np.stack([run.run(None, {"A": x[i : i + 1]})[0][0] for i in range(17)])
        marks = []
        for m in range(2, 18):
            y = run.run(None, {"A": x[:m]})[0]
            marks.append("".join("=" if np.array_equal(y[i], two[i]) else "x" for i in range(m)))
        alone = "=" if np.array_equal(one, two) else f"x (max {np.abs(one - two).max():.2g})"
        print(
            f"K {k} N {n} int{bits} accuracy_level {accuracy}: one row vs two {alone}; rows of 2..17: {' '.join(marks)}"
        )


if __name__ == "__main__":
    main()
