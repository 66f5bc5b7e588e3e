"""Train and export the small quickstart demo model.

Run as ``python -m models.demo [--out models/demo] [--minutes 6]``. A small Llama
(hidden 128, 4 layers, 4 heads, 2 KV heads, context 512) and its own byte-level
BPE tokenizer (vocab 1536) are trained on CPU for a fixed time budget on an
offline English corpus (see :mod:`models.demo_corpus`), then exported at int8
with the onnxruntime-genai builder. Torch is limited to one thread by default.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from models import builder, demo_corpus, tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "demo"
VOCAB = 1536
HIDDEN = 128
INTERMEDIATE = 384
LAYERS = 4
HEADS = 4
KV_HEADS = 2
CONTEXT = 512
SEQ_LEN = 128
BATCH = 16
LR = 3e-3
WARMUP = 50
EOS_IDS: list[int] = [tokenizer.EOS_ID, tokenizer.END_ID]
PROMPTS: tuple[str, ...] = ("The edge agent", "The device", "Return the")


def make_config() -> LlamaConfig:
    """Return the demo model's Llama config."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.BOS_ID,
        eos_token_id=EOS_IDS,
        pad_token_id=tokenizer.PAD_ID,
    )


def token_stream(tok: tokenizer.Tokenizer, docs: list[str], seed: int) -> torch.Tensor:
    """Encode ``docs`` in a seeded random order as one ``<s> doc </s>`` stream."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for i in order:
        ids += [tokenizer.BOS_ID, *tok.encode(docs[i]).ids, tokenizer.EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, total: int, peak: float = LR) -> float:
    """Linear warm-up then cosine decay to 10% of ``peak``."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, data: torch.Tensor, seconds: float, seed: int) -> dict:
    """Train ``model`` on random windows of ``data`` for about ``seconds``; return stats."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)

    def step(i: int, total: int) -> float:
        starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(i, total)
        # HF shifts the labels internally, so inputs and labels are the same window.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    start = time.monotonic()
    calib = 5
    for i in range(calib):
        step(i, 10_000)
    per_step = (time.monotonic() - start) / calib
    total = max(calib + 1, int(seconds / per_step))
    print(f"{per_step:.3f} s/step -> {total} steps of {BATCH}x{SEQ_LEN} tokens", flush=True)
    ema = None
    for i in range(calib, total):
        loss = step(i, total)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if i % 100 == 0 or i == total - 1:
            print(f"step {i:5d}/{total}  loss {ema:.3f}  {time.monotonic() - start:6.0f}s", flush=True)
    model.eval()
    return {
        "steps": total,
        "tokens_seen": total * BATCH * SEQ_LEN,
        "final_loss": round(ema or 0.0, 3),
        "seconds": round(time.monotonic() - start),
    }


def sample(model_dir: Path, prompt: str, max_new: int = 40) -> str:
    """Greedy-decode ``max_new`` tokens after ``prompt`` with onnxruntime-genai."""
    from tokenizers import Tokenizer

    from models.fixtures import smoke_test

    ids = smoke_test(model_dir, prompt, steps=max_new)
    return str(Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(ids))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    docs = demo_corpus.documents()
    tok = tokenizer.train_bpe(docs, VOCAB, min_frequency=2)
    if tok.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB}")
    data = token_stream(tok, docs, args.seed)
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,d} chars, {len(data):,d} tokens")

    model = LlamaForCausalLM(make_config())
    print(f"model: {sum(p.numel() for p in model.parameters()):,d} parameters")
    stats = train(model, data, args.minutes * 60, args.seed)
    print(f"training: {stats}")

    with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
        hf_dir = Path(tmp) / "hf"
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.BOS_ID, eos_token_id=EOS_IDS, pad_token_id=tokenizer.PAD_ID
        )
        model.save_pretrained(str(hf_dir))
        tokenizer.save(tok, hf_dir, CONTEXT)
        if args.out.exists():
            for child in args.out.iterdir():
                child.unlink()
        builder.build(hf_dir, args.out, "int8", quiet=True)
    builder.set_eos(args.out, EOS_IDS)
    print(f"wrote {args.out}:\n{builder.describe(args.out)}")
    for prompt in PROMPTS:
        print(f"{prompt!r} -> {sample(args.out, prompt)!r}")
    chat = "<|user|>\nWhat is the edge agent?<|end|>\n<|assistant|>\n"
    print(f"chat -> {sample(args.out, chat)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
