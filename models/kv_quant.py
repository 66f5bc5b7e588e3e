"""Store a model's KV cache in int8 with static per-channel scales calibrated on the float model.

    python -m models.kv_quant MODEL_DIR [--prompt-tokens 1024] [--chunk 256] [--margin 1.25] [--sweep 256]

onnxruntime 1.32's CPU ``GroupQueryAttention`` keeps an int8 cache when its past and
present tensors are declared int8 and it is given ``k_quant_type``/``v_quant_type``
``PER_CHANNEL`` with ``k_scale``/``v_scale`` of shape ``[1, kv_heads, 1, head_size]``
(``kv_cache_bit_width`` 8): it rounds each new key and value to ``round(x / scale)``,
clamped to [-128, 127], and reads every row of the cache back through the scale,
the rows of the current chunk included, so the result does not depend on how a
prompt was chunked and a prefix-cache hit reads what a cold run wrote.  Unlike a
float16 cache it does not widen the whole cache into float32 scratch (docs/memory.md).
The kernel computes the same int8 bytes on x86-64 and aarch64
(``bench/gqa_int8_arm_repro.py``).

The scales are static, so they are calibrated here: the float graph is run on
text from ``models.demo_corpus`` (``--prompt-tokens`` tokens in chunks of
``--chunk``) and on every token of the vocabulary once (shuffled, in sequences of up
to ``--sweep`` tokens, at most the context; 0 leaves the sweep out), and each layer's
largest ``|key|`` and ``|value|`` per head and channel (keys after the rotary
embedding, as the kernel stores them) is kept, multiplied by ``--margin`` and divided
by 127.  A value beyond its range is clamped, off by far more than half a step: the
sweep is there so that no token is new to the scales.  Calibrated on the text alone,
tokens the text lacks went past the range (up to 1.5 times on the fixtures, hundreds
of values over a few sampled continuations), which is why greedy tokens left the
accuracy bound on the path emulated aarch64 took (docs/memory.md).  After the sweep
the first layer's values cannot go past it (they depend on the token alone); its keys
only by turning with the position (a token is seen at one), later layers' keys and
values with the context: rarely, and by 1.1-1.2 times at most on the fixtures.  The
sweep costs a prefill of the vocabulary's size: 32,064 tokens for Phi-3-mini, about 21
minutes at the 25 tok/s measured for the 32-layer float graph (2 threads, load 4-5).
The graph is rewritten in place (the scales are small initializers in
``model.onnx``, how they were made is in its metadata under ``CALIBRATION_KEY``; a graph
without it predates the sweep); the weights file is not touched.  Rounding moves each key and value
by at most half a step, so logits move slightly and greedy tokens can differ where
two candidates are nearly tied (measured bounds: docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

QMAX = 127
K_SCALE_INPUT = 12  # GroupQueryAttention's k_scale and v_scale input slots
V_SCALE_INPUT = 13
MARGIN = 1.25
SWEEP = 256  # tokens per sequence of the vocabulary sweep (at most the context)
CALIBRATION_KEY = "edge_agent.kv_int8_calibration"  # the graph's metadata: how the scales were made


def channel_scales(absmax: npt.NDArray[np.float32], margin: float = MARGIN) -> npt.NDArray[np.float32]:
    """Per-channel int8 scales ``[1, kv_heads, 1, head_size]`` from the largest ``|x|`` ``[kv_heads, head_size]``.

    A channel never seen away from zero gets the smallest positive step of its layer
    (its values round to 0 and stay exact).
    """
    if margin < 1.0:
        raise ValueError("margin must be at least 1")
    wide = np.asarray(absmax, dtype=np.float64) * margin / QMAX
    floor = max(float(wide.max()), 1.0) * 1e-6
    return np.maximum(wide, floor).astype(np.float32)[None, :, None, :]


def _decoder(model_dir: Path) -> dict[str, object]:
    config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    decoder: dict[str, object] = config["model"]["decoder"]
    return decoder


def _layer_names(decoder: dict[str, object], layer: int) -> tuple[str, str, str, str]:
    inputs, outputs = decoder["inputs"], decoder["outputs"]
    assert isinstance(inputs, dict) and isinstance(outputs, dict)
    return (
        inputs["past_key_names"] % layer,
        inputs["past_value_names"] % layer,
        outputs["present_key_names"] % layer,
        outputs["present_value_names"] % layer,
    )


def observe(
    model_dir: Path, sequences: list[list[int]], chunk: int = 256
) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """Each layer's largest ``|key|`` and ``|value|`` ``[kv_heads, head_size]`` over ``sequences`` (float graph).

    Each sequence is run from an empty cache in chunks of ``chunk`` tokens (keys after the
    rotary embedding, as the kernel stores them).
    """
    import onnxruntime as ort

    decoder = _decoder(model_dir)
    layers = int(str(decoder["num_hidden_layers"]))
    kv_heads, head_size = int(str(decoder["num_key_value_heads"])), int(str(decoder["head_size"]))
    inputs = decoder["inputs"]
    assert isinstance(inputs, dict)
    session = ort.InferenceSession(
        str(model_dir / str(decoder["filename"])), providers=["CPUExecutionProvider"]
    )
    wanted = {i.name for i in session.get_inputs()}
    names = [_layer_names(decoder, i) for i in range(layers)]
    outputs = [n for layer in names for n in layer[2:]]
    ranges = [(np.zeros((kv_heads, head_size), np.float32),) * 2 for _ in names]
    for token_ids in sequences:
        past = {n: np.zeros((1, kv_heads, 0, head_size), np.float32) for layer in names for n in layer[:2]}
        for start in range(0, len(token_ids), chunk):
            ids = np.asarray([token_ids[start : start + chunk]], dtype=np.int64)
            end = start + ids.shape[1]
            feed: dict[str, npt.NDArray[np.generic]] = {inputs["input_ids"]: ids, **past}
            feed[inputs["attention_mask"]] = np.ones((1, end), np.int64)
            if inputs.get("position_ids") in wanted:
                feed[inputs["position_ids"]] = np.arange(start, end, dtype=np.int64)[None]
            values = dict(zip(outputs, session.run(outputs, feed), strict=True))
            past = {layer[j]: values[layer[j + 2]] for layer in names for j in (0, 1)}
        ranges = [
            (
                np.maximum(key_range, np.abs(past[k][0]).max(axis=1).astype(np.float32)),
                np.maximum(value_range, np.abs(past[v][0]).max(axis=1).astype(np.float32)),
            )
            for (key_range, value_range), (k, v, _, _) in zip(ranges, names, strict=True)
        ]
    return ranges


def quantize_kv(
    model_dir: Path,
    scales: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    calibration: str = "given scales",
) -> int:
    """Declare ``model_dir``'s cache int8 with per-layer (key, value) ``scales``; returns the layers rewritten.

    ``calibration`` (how the scales were made) goes into the graph's metadata under
    ``CALIBRATION_KEY`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``), so a
    reader can tell scales calibrated with the vocabulary sweep from older ones.
    """
    decoder = _decoder(model_dir)
    graph_file = model_dir / str(decoder["filename"])
    model = onnx.load(str(graph_file), load_external_data=False)
    graph = model.graph
    by_past = {n.input[3]: n for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 4}
    io = {v.name: v for v in [*graph.input, *graph.output]}
    if len(scales) != int(str(decoder["num_hidden_layers"])):
        raise SystemExit(f"error: {len(scales)} layers of scales for {decoder['num_hidden_layers']} layers")
    for layer, (k_scale, v_scale) in enumerate(scales):
        past_k, past_v, present_k, present_v = _layer_names(decoder, layer)
        node = by_past.get(past_k)
        if node is None or node.input[4] != past_v:
            raise SystemExit(
                f"error: no GroupQueryAttention reads {past_k} and {past_v}: not a builder export"
            )
        if any(a.name == "k_quant_type" and a.s != b"NONE" for a in node.attribute):
            raise SystemExit(f"error: {graph_file}'s cache is quantized already")
        for name in (past_k, past_v, present_k, present_v):
            io[name].type.tensor_type.elem_type = onnx.TensorProto.INT8
        names = (f"{past_k}_scale", f"{past_v}_scale")
        for name, value in zip(names, (k_scale, v_scale), strict=True):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        while len(node.input) <= V_SCALE_INPUT:
            node.input.append("")
        node.input[K_SCALE_INPUT], node.input[V_SCALE_INPUT] = names
        kept = [
            a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
        ]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, CALIBRATION_KEY: calibration}
    )
    onnx.save(model, str(graph_file))
    return len(scales)


def calibration_ids(model_dir: Path, tokens: int) -> list[int]:
    """``tokens`` token ids of ``models.demo_corpus`` text for ``model_dir`` (at most its context)."""
    from agent.engine.model_folder import ModelFolder
    from agent.engine.tokenizer import Tokenizer
    from models import demo_corpus

    folder = ModelFolder(model_dir)
    tokenizer = Tokenizer(folder)
    tokens = min(tokens, folder.context_length)
    with warnings.catch_warnings():  # importing some stdlib modules for their docstrings warns
        warnings.simplefilter("ignore")
        documents = demo_corpus.documents()
    ids: list[int] = []
    for text in documents:
        ids += tokenizer.encode(text)
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def vocabulary_sweep(model_dir: Path, length: int) -> list[list[int]]:
    """Every token id of ``model_dir``'s vocabulary once, shuffled (fixed seed), in sequences of ``length``."""
    from agent.engine.model_folder import ModelFolder

    folder = ModelFolder(model_dir)
    length = max(1, min(length, folder.context_length))
    ids = np.random.default_rng(0).permutation(int(folder.config.model.vocab_size)).tolist()
    return [ids[i : i + length] for i in range(0, len(ids), length)]


def calibrate(
    model_dir: Path, tokens: int = 1024, chunk: int = 256, margin: float = MARGIN, sweep: int = SWEEP
) -> int:
    """Calibrate ``model_dir``'s float cache and rewrite it int8; returns the layers.

    On ``tokens`` of text and, unless ``sweep`` is 0, the whole vocabulary in sequences of ``sweep`` tokens.
    """
    scales, how = calibrated_scales(model_dir, tokens, chunk, margin, sweep)
    return quantize_kv(model_dir, scales, how)


def calibrated_scales(
    model_dir: Path, tokens: int = 1024, chunk: int = 256, margin: float = MARGIN, sweep: int = SWEEP
) -> tuple[list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]], str]:
    """Each layer's key and value scales for ``model_dir``'s float graph, and how they were made (``calibrate``)."""
    sequences = [calibration_ids(model_dir, tokens)]
    if sweep:
        sequences += vocabulary_sweep(model_dir, sweep)
    observed = observe(model_dir, sequences, chunk)
    how = f"per-channel, margin {margin}, {len(sequences[0])} tokens of text"
    how += f", vocabulary sweep in sequences of {sweep}" if sweep else ", no vocabulary sweep"
    return [(channel_scales(k, margin), channel_scales(v, margin)) for k, v in observed], how


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--margin", type=float, default=MARGIN)
    parser.add_argument(
        "--sweep", type=int, default=SWEEP, help="vocabulary sweep: tokens per sequence (0: no sweep)"
    )
    args = parser.parse_args(argv)
    layers = calibrate(args.model_dir, args.prompt_tokens, args.chunk, args.margin, args.sweep)
    print(f"{args.model_dir}: KV cache int8 in {layers} layers (per-channel scales, margin {args.margin})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
