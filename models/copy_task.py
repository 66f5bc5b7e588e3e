"""Train and export a small model that copies: extraction and reformatting of log records.

Run as ``python -m models.copy_task [--out models/copy] [--steps 5000]`` (about 15 minutes
on two idle cores); it writes the checkpoint (``OUT/hf``) and its int8 and int4 exports
(``OUT/int8``, ``OUT/int4``) and prints their exact-match accuracy.  Random-weight
models never accept a prompt-lookup draft, so speculative decoding is measured on
this one: a Llama (hidden 128, 3 layers, 4 heads of 32, 2 KV heads, context 512)
with its own byte-level BPE tokenizer (vocab 512), trained from scratch the way
:mod:`models.demo` is, on generated jobs whose answers are spans of their prompts:

* ``extract``: a record of ``key=value`` fields and a key; the answer is its value.
* ``reformat``: a record; the answer is every field as ``key: value`` on its own line.
* ``quote``: a message; the answer is the message, verbatim.

Values are made of random syllables and digits, so the model can only answer by
copying from its prompt (attention), never by remembering.  :func:`check` scores
greedy answers on fresh jobs by exact match: the task is checkable.  A share of the
training rows repeats runs of random tokens (:data:`REPEAT_SHARE`): the plainest
copying, on which the induction heads that copying needs form early.
:mod:`models.edge_cost` pads the checkpoint to Phi-3-mini's layer shapes.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "copy"
VOCAB = 512
CONTEXT = 512
KINDS = ("extract", "reformat", "quote")
_KEYS = ("host", "unit", "level", "msg", "code", "user", "path", "zone", "rack", "op")
_SYLLABLES = [
    "ka",
    "ri",
    "to",
    "mo",
    "sa",
    "ne",
    "lu",
    "vi",
    "de",
    "po",
    "gra",
    "sen",
    "tal",
    "mir",
    "bor",
    "fen",
    "qua",
    "zel",
    "dro",
    "pix",
    "ul",
    "an",
    "or",
    "em",
    "it",
    "ys",
    "ob",
    "ar",
    "en",
    "ix",
]
_LEVELS = ("info", "warn", "error", "debug")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))


def _value(rng: random.Random, key: str) -> str:
    if key == "level":
        return rng.choice(_LEVELS)
    if key in ("code", "rack"):
        return str(rng.randint(0, 99999))
    if key == "path":
        return "/" + "/".join(_word(rng) for _ in range(rng.randint(1, 3)))
    if key == "msg":
        return " ".join(
            _word(rng) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(rng.randint(2, 8))
        )
    return _word(rng) + (f"-{rng.randint(0, 99)}" if rng.random() < 0.5 else "")


def _record(rng: random.Random) -> list[tuple[str, str]]:
    keys = rng.sample(_KEYS, rng.randint(3, 6))
    return [(k, _value(rng, k)) for k in keys]


def _line(fields: list[tuple[str, str]]) -> str:
    return " |".join(f" {k}: {v}" for k, v in fields)


def job(rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """One generated job: (prompt, answer).  The answer copies spans of the prompt.

    Every copied word has a space before it in the prompt and in the answer, so a
    span is the same tokens in both (byte-level BPE folds the space into the word).
    """
    kind = kind or rng.choice(KINDS)
    fields = _record(rng)
    if kind == "extract":
        key, value = rng.choice(fields)
        return f"record:{_line(fields)}\nextract{' ' + key}:", f" {value}"
    if kind == "reformat":
        return f"record:{_line(fields)}\nreformat:", "".join(f"\n- {k}: {v}" for k, v in fields)
    message = " ".join(_value(rng, "msg") for _ in range(rng.randint(1, 3)))
    return f"message: {message}\nquote:", f" {message}"


def documents(count: int, seed: int) -> list[str]:
    """``count`` training documents: each a job's prompt followed by its answer."""
    rng = random.Random(seed)
    return [prompt + answer for prompt, answer in (job(rng) for _ in range(count))]


def check(generate: Callable[[str], str], count: int = 60, seed: int = 99) -> dict[str, float]:
    """Exact-match accuracy of ``generate(prompt) -> answer`` on fresh jobs, per kind."""
    rng = random.Random(seed)
    scores: dict[str, float] = {}
    for kind in KINDS:
        jobs = [job(rng, kind) for _ in range(count // len(KINDS))]
        scores[kind] = sum(generate(p).strip() == a.strip() for p, a in jobs) / len(jobs)
    return scores


LAYERS = 3
HIDDEN = 128
HEADS = 4  # head size 32: the CPU attention kernel needs a multiple of 16
INTERMEDIATE = 384
BATCH = 32
SEQ_LEN = 128
LR = 1.5e-3  # peak of models.demo's schedule (warm-up, then cosine decay)
# Share of rows that repeat random token runs (loss on the repeats): the plainest copying there is.
# Two-layer induction heads form on it within a few hundred steps; on the jobs alone, where answer
# tokens are a small part of each row, they had not formed after 2,500 steps.
REPEAT_SHARE = 0.4
STEPS = 5000


def make_config(heads: int = HEADS) -> Any:
    """The copy model's Llama config (the demo's, smaller)."""
    from models import demo

    config = demo.make_config()
    config.vocab_size = VOCAB
    config.max_position_embeddings = CONTEXT
    config.num_hidden_layers = LAYERS
    config.hidden_size = HIDDEN
    config.intermediate_size = INTERMEDIATE
    config.num_attention_heads = heads
    config.head_dim = HIDDEN // heads
    return config


def _repeats(rng: random.Random, ids: Any, labels: Any, row: int) -> None:
    """Fill ``row`` with runs of random tokens, each followed by itself; the second copy is the answer."""
    import torch

    from models import tokenizer

    pos = 0
    while True:
        length = rng.randint(6, 30)
        if pos + 2 * length + 1 > SEQ_LEN:
            return
        run = torch.tensor([rng.randrange(len(tokenizer.SPECIAL_TOKENS), VOCAB) for _ in range(length)])
        ids[row, pos] = tokenizer.BOS_ID
        ids[row, pos + 1 : pos + 1 + length] = run
        ids[row, pos + 1 + length : pos + 1 + 2 * length] = run
        labels[row, pos + 2 + length : pos + 1 + 2 * length] = run[1:]
        pos += 2 * length + 1


def batches(tok: Any, seed: int) -> Iterator[tuple[Any, Any]]:
    """Endless (input_ids, labels) batches: whole jobs packed into ``SEQ_LEN`` rows, and repeat rows.

    Only answer tokens (and the ``</s>`` after them) carry a loss: the records are
    random, so predicting them teaches nothing; copying them out is the skill.
    """
    import torch

    from models import tokenizer

    rng = random.Random(seed)
    while True:
        ids = torch.full((BATCH, SEQ_LEN), tokenizer.PAD_ID, dtype=torch.long)
        labels = torch.full((BATCH, SEQ_LEN), -100, dtype=torch.long)
        for row in range(BATCH):
            if rng.random() < REPEAT_SHARE:
                _repeats(rng, ids, labels, row)
                continue
            pos = 0
            while True:
                prompt, answer = job(rng)
                p = [tokenizer.BOS_ID, *tok.encode(prompt).ids]
                a = [*tok.encode(answer).ids, tokenizer.EOS_ID]
                if pos + len(p) + len(a) > SEQ_LEN:
                    break
                ids[row, pos : pos + len(p) + len(a)] = torch.tensor(p + a)
                labels[row, pos + len(p) : pos + len(p) + len(a)] = torch.tensor(a)
                pos += len(p) + len(a)
        yield ids, labels


def train(model: Any, tok: Any, steps: int, seed: int) -> dict[str, Any]:
    """AdamW on answer tokens for ``steps`` steps (the demo's optimizer and schedule); return stats."""
    import torch

    from models import demo

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    data = batches(tok, seed)
    model.train()
    start = time.monotonic()
    ema: float | None = None
    total = steps  # a fixed count, not a time budget: the box may be shared, the model must not vary
    for step in range(total):
        ids, labels = next(data)
        for group in opt.param_groups:
            group["lr"] = demo.lr_at(step, total, peak=LR)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0:
            print(
                f"step {step:5d}/{total}  answer loss {ema:.3f}  {time.monotonic() - start:5.0f}s", flush=True
            )
    model.eval()
    return {
        "steps": total,
        "final_answer_loss": round(ema or 0.0, 3),
        "seconds": round(time.monotonic() - start),
    }


def export(hf_dir: Path, out: Path, precision: str) -> Path:
    """An onnxruntime-genai builder export of the checkpoint in ``hf_dir`` (all-position logits)."""
    import shutil

    from models import builder, demo

    shutil.rmtree(out, ignore_errors=True)
    builder.build(hf_dir, out, precision, quiet=True)
    builder.set_eos(out, demo.EOS_IDS)
    return out


def accuracy(model_dir: Path) -> dict[str, float]:
    """Exact-match accuracy of the exported model's greedy answers on fresh jobs, per kind."""
    from agent.engine.engine import Engine
    from agent.engine.sampling import SamplingParams
    from models import tokenizer

    engine = Engine(model_dir)

    def answer(prompt: str) -> str:
        ids = [tokenizer.BOS_ID, *engine.tokenizer.encode(prompt, add_special_tokens=False)]
        return engine.generate(ids, SamplingParams(max_tokens=96)).text

    return check(answer)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from models import demo, tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT/hf, OUT/int8, OUT/int4")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export-only", action="store_true", help="export OUT/hf again, no training")
    args = parser.parse_args(argv)

    hf_dir = args.out / "hf"
    started = time.monotonic()
    if not args.export_only:
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        tok = tokenizer.train_bpe(documents(5_000, args.seed), VOCAB, min_frequency=2)
        if tok.get_vocab_size() != VOCAB:
            raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB}")
        model = LlamaForCausalLM(make_config())
        print(f"model: {sum(p.numel() for p in model.parameters()):,d} parameters")
        stats = train(model, tok, args.steps, args.seed)
        print(f"training: {stats}")
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.BOS_ID, eos_token_id=demo.EOS_IDS, pad_token_id=tokenizer.PAD_ID
        )
        model.save_pretrained(str(hf_dir))
        tokenizer.save(tok, hf_dir, CONTEXT)
    for precision in ("int8", "int4"):
        out = export(hf_dir, args.out / precision, precision)
        print(f"{out}: exact-match accuracy on fresh jobs {accuracy(out)}", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
