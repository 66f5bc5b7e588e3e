"""The row-keeping export (``models.logits_rows``, ``models.convert``'s default) against the full-logits one.

Its lm_head computes the last ``num_logits_to_keep`` rows of a pass: a prefill chunk asks for one
row, or two where the engine pairs rows (``Engine.even_rows``), a verify pass for the rows it
checks (an even count where rows pair), a decode pass for its one.  Guarantee ``KEPT_ROWS_EXACT``
(``tests/support/cpu.py``): every logit the engine reads from it is the full-logits export's, bit
for bit -- chunked, after a prefix hit, batched, speculating -- so every guarantee of the full
export (``test_even_rows.py``, ``test_speculative_parity.py``) carries over.  The fixtures are
rewritten copies of ``llama-int4-b128`` (int4 in blocks of 128: rows computed in pairs on AVX-512
VNNI), ``llama-int4`` (block 32) and ``phi3-int4-pruned`` (the pruned ``Gather`` replaced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from agent import Engine, SamplingParams
from agent.engine import prepacked
from agent.engine.engine import EngineOptions
from agent.engine.graph_io import LOGITS_TO_KEEP
from agent.engine.memory_plan import model_shape
from agent.engine.speculate import DraftPolicy
from models import logits_rows
from tests.support import cpu
from tests.support.logits import Rows, assert_batched_as_solo, assert_same, drafting, forced, speculating
from tests.support.models import fixture_path, rewritten_fixture

PAIRED = "llama-int4-b128"
NAMES = [PAIRED, "llama-int4"]
TEXT = "The quick brown fox jumps over the lazy dog; the dog sleeps, the fox runs on and on."


@pytest.fixture(scope="module")
def kept_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kept")
    return {
        name: rewritten_fixture(name, root, logits_rows.keep_rows, "kept")
        for name in (*NAMES, "phi3-int4-pruned")
    }


def _engine(path: Path, **options: Any) -> Engine:
    return Engine(path, EngineOptions(threads=1, **options))


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, tokens: int) -> dict[str, npt.NDArray[Any]]:
    feeds: dict[str, npt.NDArray[Any]] = {
        "input_ids": np.arange(3, 3 + tokens, dtype=np.int64)[None],
        "attention_mask": np.ones((1, tokens), dtype=np.int64),
    }
    for item in session.get_inputs():
        if item.name.startswith("past_key_values"):
            feeds[item.name] = np.zeros((1, item.shape[1], 0, 64), dtype=np.float32)  # head size 64
    return feeds


def test_the_lm_head_takes_the_last_rows_asked_for_and_every_row_by_default(
    kept_dir: dict[str, Path],
) -> None:
    full, kept = _session(fixture_path(PAIRED)), _session(kept_dir[PAIRED])
    assert LOGITS_TO_KEEP not in {i.name for i in full.get_inputs() + full.get_overridable_initializers()}
    assert [i.name for i in kept.get_overridable_initializers()] == [
        LOGITS_TO_KEEP
    ]  # an input with a default
    assert logits_rows.keep_rows(kept_dir[PAIRED]) is False  # done once
    feeds = _feeds(full, 10)
    want = full.run(["logits"], feeds)[0]
    assert want.shape[1] == 10
    (default,) = kept.run(["logits"], feeds)  # a runtime that does not know the input: every row
    assert np.array_equal(default, want)
    for n, rows in ((0, 10), (2, 2), (4, 4), (10, 10), (99, 10)):
        (got,) = kept.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array([n], dtype=np.int64)})
        assert got.shape[1] == rows
        if cpu.family() in cpu.KEPT_ROWS_EXACT:  # an even count from the end of an even pass: same pairs
            assert np.array_equal(got, want[:, 10 - rows :]), f"last {n} rows"


def test_a_pruned_export_rewritten_is_the_full_exports_lm_head(kept_dir: dict[str, Path]) -> None:
    full = Engine(fixture_path("phi3-int4"))  # the same weights, every row
    kept, pruned = Engine(kept_dir["phi3-int4-pruned"]), Engine(fixture_path("phi3-int4-pruned"))
    assert (kept.graph.keeps_rows, kept.graph.verifies) == (True, True)
    assert (pruned.graph.keeps_rows, pruned.graph.verifies) == (False, False)
    assert (full.graph.keeps_rows, full.graph.verifies) == (False, True)
    assert [g.graph.prefill_logits_rows(50, even=True) for g in (kept, pruned, full)] == [2, 1, 50]
    assert kept.graph.prefill_logits_rows(50) == 1
    # The memory plan counts a chunk's logits for one or two rows, as for the pruned export.
    assert not model_shape(kept.folder.path).full_logits and model_shape(full.folder.path).full_logits
    prompt = kept.prompt_ids(TEXT)
    tokens = kept.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True)).token_ids
    if cpu.family() in cpu.KEPT_ROWS_EXACT:
        assert_same(forced(kept, prompt, tokens), forced(full, prompt, tokens), "rewritten pruned export")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [37, 38])
def test_chunked_and_resumed_prefills_give_the_full_exports_logits(
    name: str, length: int, kept_dir: dict[str, Path]
) -> None:
    assert cpu.family() in cpu.KEPT_ROWS_EXACT
    full = _engine(fixture_path(name), prefix_cache_mb=0)
    prompt = full.prompt_ids(TEXT * 3)[:length]
    tokens = full.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True)).token_ids
    want = forced(full, prompt, tokens)
    for chunk in (2, 7, 8, 128):
        engine = _engine(kept_dir[name], prefix_cache_mb=0, prefill_chunk_tokens=chunk)
        assert_same(forced(engine, prompt, tokens), want, f"{name}, {length} tokens in chunks of {chunk}")
    for split in (13, 14, 21):
        warm = _engine(kept_dir[name], prefill_chunk_tokens=8, prefix_block_tokens=4)
        forced(warm, prompt[:split], [prompt[split]])
        warm.release_kept()
        before = warm.prefix_cache_stats()
        got = forced(warm, prompt, tokens)
        after = warm.prefix_cache_stats()
        assert before is not None and after is not None
        assert after.cached_tokens - before.cached_tokens >= split - 3  # positive control: a hit
        assert_same(got, want, f"{name}, resumed after {split} of {length} tokens")


@pytest.mark.parametrize("name", NAMES)
def test_three_sequences_batched_give_the_full_exports_solo_logits(
    name: str, kept_dir: dict[str, Path]
) -> None:
    assert cpu.family() in cpu.KEPT_ROWS_EXACT
    full, engine = _engine(fixture_path(name), prefix_cache_mb=0), _engine(kept_dir[name], prefix_cache_mb=0)
    prompts = [full.prompt_ids(TEXT * 3)[:n] for n in (9, 14, 23)]
    assert_batched_as_solo(full, engine, prompts, f"{name}, the full export solo")


@pytest.mark.parametrize("name", NAMES)
def test_it_speculates_with_the_full_exports_logits_whatever_it_drafts(
    name: str, kept_dir: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cpu.family() in cpu.KEPT_ROWS_EXACT
    full = _engine(fixture_path(name), prefix_cache_mb=0, speculate_max_k=5)
    engine = _engine(kept_dir[name], prefix_cache_mb=0, speculate_max_k=5)
    prompt = engine.prompt_ids(TEXT * 2)
    tokens = engine.prompt_ids(TEXT)[:30]  # a copy of the prompt: drafts get accepted
    drafted: dict[str, int] = {}
    plain: Rows = []
    for mode in ("never", "always", "random"):
        monkeypatch.setattr(DraftPolicy, "choose", drafting(mode))
        want, _ = speculating(full, prompt, tokens)
        rows, drafted[mode] = speculating(engine, prompt, tokens)
        assert_same(rows, want, f"{name}, drafting {mode}: the full export drafting alike")
        plain = plain or rows
        if cpu.family() in cpu.DRAFT_EXACT:  # and whatever was drafted (aarch64: near-ties may move)
            assert_same(rows, plain, f"{name}, drafting {mode}: never drafting")
    assert drafted["never"] == 0 and drafted["always"] > 10 and drafted["random"] > 0  # positive control


def test_a_trained_model_speculates_on_its_row_keeping_export_as_it_decodes_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.demo_corpus import EDGE_TEXT
    from tests.support.models import ROOT

    folder = tmp_path / "demo"
    import shutil

    shutil.copytree(ROOT / "models" / "demo", folder)
    assert logits_rows.keep_rows(folder)
    plain = Engine(ROOT / "models" / "demo", EngineOptions(threads=1))
    spec = Engine(folder, EngineOptions(threads=1, speculate=True))
    monkeypatch.setattr(DraftPolicy, "choose", drafting("always"))  # not what the pass costs measure
    start = " ".join(EDGE_TEXT.splitlines()[0].split()[:4])
    ids = plain.prompt_ids(f"Here is a text:\n{EDGE_TEXT}\nThe same text again:\n{start}")
    want = plain.generate(ids, SamplingParams(max_tokens=100))
    got = spec.generate(ids, SamplingParams(max_tokens=100))
    assert got.token_ids == want.token_ids and got.accepted_tokens > 0  # positive control: drafts accepted


def test_onnxruntime_genai_runs_it_as_the_full_export(kept_dir: dict[str, Path]) -> None:
    import onnxruntime_genai as og

    from tests.support.genai import genai_greedy

    engine = Engine(fixture_path("llama-int4"))
    ids = engine.prompt_ids(TEXT)
    want = genai_greedy(og.Model(str(fixture_path("llama-int4"))), engine.eos_ids, ids, 12)
    assert len(want) >= 6  # positive control: something was generated
    assert genai_greedy(og.Model(str(kept_dir["llama-int4"])), engine.eos_ids, ids, 12) == want


def test_the_repacked_copy_on_disk_still_takes_the_input(kept_dir: dict[str, Path], tmp_path: Path) -> None:
    folder = kept_dir[PAIRED]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = list(range(7, 47))
    plain = Engine(folder).generate(prompt, params).token_ids
    Engine(folder, prepacked_dir=tmp_path)  # makes the copy
    mapped = Engine(folder, prepacked_dir=tmp_path, options=EngineOptions(speculate=True))  # maps it
    assert (prepacked.copy_dir(tmp_path, folder) / prepacked.DATA_FILE).is_file()  # positive control
    assert mapped.graph.keeps_rows and mapped.generate(prompt, params).token_ids == plain


def test_a_converted_folder_keeps_rows_in_both_kv_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.models import convert_fixture

    out = convert_fixture(tmp_path, monkeypatch)  # models.convert's defaults on phi3-int4's export
    float32, int8 = (
        Engine(out, EngineOptions(kv_cache="float32")),
        Engine(out, EngineOptions(kv_cache="int8")),
    )
    assert (float32.kv_cache, int8.kv_cache) == ("float32", "int8")  # positive control: two graphs
    assert float32.graph.keeps_rows and int8.graph.keeps_rows
    (tmp_path / "full").mkdir()
    full = convert_fixture(tmp_path / "full", monkeypatch, "--full-prefill-logits")
    assert not Engine(full, EngineOptions(kv_cache="int8")).graph.keeps_rows
