"""Pad a small trained Llama to an edge-sized one whose extra weights contribute exactly nothing.

Run as ``python -m models.edge_cost SMALL_HF_DIR OUT_HF_DIR [--layers 4]``.

A model trained here is tiny, so a pass over it costs a few arithmetic
microseconds and measures Python, not weight traffic.  This writes a checkpoint
of the Phi-3-mini shape (hidden 3072, 32 heads of 96, intermediate 8192, vocab
32064) that computes the small model's function: each pass reads a Phi-3-mini
layer's worth of weights per layer while the output is the trained model's, up to
float rounding.  Figures measured on it are labelled "padded" in the README.

How each part stays the small model's:

* The residual stream keeps the small model's values in its first ``hidden``
  dimensions and zeros elsewhere (every weight writing to the other dimensions is
  zero), except one dimension that holds a small constant (see the vocabulary).
* RMSNorm averages over 3072 dimensions instead of ``hidden``: the norm weights are
  divided by ``sqrt(3072 / hidden)`` and epsilon by ``3072 / hidden``, which is the
  same function.
* Heads of 32 become heads of 96: rotate-half pairs ``(j, j + 16)`` land on
  ``(j, j + 48)``, whose rotary frequencies equal the small head's when the rotary
  base is the small base cubed; queries are scaled by ``sqrt(96 / 32)`` for the
  attention scale.  Grouped KV heads are repeated (Phi-3-mini has one KV head per
  query head); the other 28 heads have zero value weights, so they add nothing.
* The MLP's extra units have zero gate and up weights: ``silu(0) * 0 == 0``.
* Extra layers (beyond the small model's) have zero value and up weights, so
  their attention and MLP outputs are exactly zero.
* Vocabulary rows beyond the small model's are zero in the embedding and, in the
  output head, read only the constant dimension with a large negative weight, so
  their logits are far below any real one and are never chosen.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

SHAPE: dict[str, int] = {
    "hidden_size": 3072,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 96,
    "intermediate_size": 8192,
    "vocab_size": 32064,
}
CONSTANT = 1e-4  # the constant dimension: tiny beside the stream (a relative change of 1e-7 in its norm)
PAD_LOGIT = -1000.0  # about what a padded token's logit comes out at (divided by the stream's RMS)


def _rows(head: int, small_hd: int, big_hd: int, rotary: bool) -> list[int]:
    """Where a small head's dimensions go in a big head (rotate-half pairs kept paired)."""
    half, big_half = small_hd // 2, big_hd // 2
    if rotary:
        return [head * big_hd + (j if j < half else big_half + j - half) for j in range(small_hd)]
    return [head * big_hd + j for j in range(small_hd)]


def pad(small: Any, layers: int) -> Any:
    """A Phi-3-mini-shaped ``LlamaForCausalLM`` computing ``small``'s function (see the module)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sc = small.config
    h, nh, nkv, hd = sc.hidden_size, sc.num_attention_heads, sc.num_key_value_heads, sc.head_dim
    big_h, big_hd, big_nh = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_attention_heads"]
    if big_hd % hd or big_hd // hd != 3 or nh > big_nh or layers < sc.num_hidden_layers or h >= big_h:
        raise ValueError("the small model must have heads of 32, at most 32 heads and fewer layers")
    ratio = big_h / h
    base = float(sc.rope_parameters["rope_theta"])
    config = LlamaConfig(
        **SHAPE,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        rms_norm_eps=sc.rms_norm_eps / ratio,
        rope_parameters={"rope_type": "default", "rope_theta": base ** (big_hd // hd)},
        tie_word_embeddings=False,
        bos_token_id=sc.bos_token_id,
        eos_token_id=sc.eos_token_id,
        pad_token_id=sc.pad_token_id,
    )
    big = LlamaForCausalLM(config)
    sd = small.state_dict()
    c = big_h - 1  # the constant dimension
    norm = 1.0 / math.sqrt(ratio)
    q_scale = math.sqrt(big_hd / hd)
    with torch.no_grad():
        for p in big.parameters():
            p.zero_()
        v = sc.vocab_size
        big.model.embed_tokens.weight[:v, :h] = sd["model.embed_tokens.weight"]
        big.model.embed_tokens.weight[:v, c] = CONSTANT
        big.model.norm.weight[:h] = sd["model.norm.weight"] * norm
        big.model.norm.weight[c] = 1.0
        big.lm_head.weight[:v, :h] = sd["lm_head.weight"]
        # normalized constant = CONSTANT * sqrt(big_h) / rms, so this row gives about PAD_LOGIT / rms.
        big.lm_head.weight[v:, c] = PAD_LOGIT / (CONSTANT * math.sqrt(big_h))
        for i, layer in enumerate(big.model.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            if i >= sc.num_hidden_layers:
                continue  # zero value and up weights: this layer adds exactly nothing
            pre = f"model.layers.{i}."
            layer.input_layernorm.weight[:h] = sd[pre + "input_layernorm.weight"] * norm
            layer.post_attention_layernorm.weight[:h] = sd[pre + "post_attention_layernorm.weight"] * norm
            att = layer.self_attn
            for head in range(nh):
                kv = head // (nh // nkv)
                small_q = slice(head * hd, (head + 1) * hd)
                small_kv = slice(kv * hd, (kv + 1) * hd)
                rot = _rows(head, hd, big_hd, rotary=True)
                att.q_proj.weight[rot, :h] = sd[pre + "self_attn.q_proj.weight"][small_q] * q_scale
                att.k_proj.weight[rot, :h] = sd[pre + "self_attn.k_proj.weight"][small_kv]
                plain = _rows(head, hd, big_hd, rotary=False)
                att.v_proj.weight[plain, :h] = sd[pre + "self_attn.v_proj.weight"][small_kv]
                att.o_proj.weight[:h, plain] = sd[pre + "self_attn.o_proj.weight"][:, small_q]
            inter = sc.intermediate_size
            mlp = layer.mlp
            mlp.gate_proj.weight[:inter, :h] = sd[pre + "mlp.gate_proj.weight"]
            mlp.up_proj.weight[:inter, :h] = sd[pre + "mlp.up_proj.weight"]
            mlp.down_proj.weight[:h, :inter] = sd[pre + "mlp.down_proj.weight"]
    big.generation_config = small.generation_config
    return big


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: pad a checkpoint and check it computes the small model's greedy text."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("small", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    small = LlamaForCausalLM.from_pretrained(str(args.small), dtype=torch.float32)
    big = pad(small, args.layers)
    ids = torch.tensor([list(range(1, 200, 3))])
    with torch.no_grad():
        a = small(ids).logits[0]
        b = big(ids).logits[0]
    diff = float((a - b[:, : a.shape[1]]).abs().max())
    worst_pad = float((b[:, a.shape[1] :].max(dim=1).values - a.max(dim=1).values).max())
    print(f"largest logit difference {diff:.2e}; padded tokens at least {-worst_pad:.0f} below the best")
    if diff > 1e-3 or worst_pad >= 0:
        raise SystemExit("the padded model does not compute the small model's function")
    big.save_pretrained(str(args.out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (args.small / name).is_file():
            shutil.copy(args.small / name, args.out / name)
    AutoTokenizer.from_pretrained(str(args.out))  # the copied tokenizer loads
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
