"""Greedy output equals onnxruntime-genai's, token for token, on every fixture.

onnxruntime-genai is the reference implementation of this model format; it is a
dev dependency installed in CI, and a missing one fails these tests.
"""

from __future__ import annotations

import onnxruntime_genai as og
import pytest

from agent import Engine, SamplingParams
from tests.support.genai import genai_greedy
from tests.support.models import ALL_FIXTURES, fixture_path

PROMPTS = ["The quick brown fox", "Grüße aus Köln 🎉 日本語", "a"]
NEW_TOKENS = 48


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_greedy_token_ids_match_onnxruntime_genai(name: str) -> None:
    path = fixture_path(name)
    engine = Engine(path)
    reference = og.Model(str(path))
    ref_tokenizer = og.Tokenizer(reference)
    generated_any = 0
    for prompt in PROMPTS:
        ids = engine.prompt_ids(prompt)
        assert ids == [int(i) for i in ref_tokenizer.encode(prompt)], "tokenization differs"
        ours = engine.generate(ids, SamplingParams(max_tokens=NEW_TOKENS))
        assert ours.token_ids == genai_greedy(reference, engine.eos_ids, ids, NEW_TOKENS)
        generated_any += len(ours.token_ids)
    # A fixture that stops at once would make this comparison vacuous.
    assert generated_any >= NEW_TOKENS


@pytest.mark.parametrize("name", ["phi3-int4", "qwen2-int8"])
def test_chat_prompt_matches_reference_template(name: str) -> None:
    path = fixture_path(name)
    engine = Engine(path)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    ids = engine.prompt_ids(messages=messages)
    reference = og.Model(str(path))
    tokenizer = og.Tokenizer(reference)
    import json

    rendered = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert ids == [int(i) for i in tokenizer.encode(rendered)]
    assert engine.generate(ids, SamplingParams(max_tokens=24)).token_ids == genai_greedy(
        reference, engine.eos_ids, ids, 24
    )


def test_last_position_logits_export_gives_the_same_tokens() -> None:
    # models.convert --last-position-logits prunes the lm_head: the prompt pass returns one row of logits.
    pruned_path = fixture_path("phi3-int4-pruned")
    pruned, full = Engine(pruned_path), Engine(fixture_path("phi3-int4"))
    assert pruned.graph.prefill_logits_rows(50) == 1 and full.graph.prefill_logits_rows(50) == 50
    reference = og.Model(str(pruned_path))
    for prompt in PROMPTS:
        ids = pruned.prompt_ids(prompt)
        ours = pruned.generate(ids, SamplingParams(max_tokens=NEW_TOKENS)).token_ids
        assert ours == full.generate(ids, SamplingParams(max_tokens=NEW_TOKENS)).token_ids
        assert ours == genai_greedy(reference, pruned.eos_ids, ids, NEW_TOKENS)
