"""How the CPU's kernels round a row by pass size, and the engine's answer to it (agent.engine.rows).

The engine measures, when it opens, whether a row of a pass with an odd number of
rows (one, three) gives the bits a row of an even pass gives (``Engine.even_rows``
is true where it does not: int4 on AVX2-only x86, whose MLAS takes a
matrix-vector kernel for one row; block 128 on AVX-512 VNNI, whose kernels pair
rows).  These tests check the measurement against what was measured per CPU
family (so a new onnxruntime that changes it is noticed and docs/engine.md
updated), and that the filler rows the engine then adds never change the real
rows' bits (``test_even_rows.py`` checks the logits).
"""

from __future__ import annotations

import pytest

from agent import Engine, SamplingParams
from agent.engine.batch import Batcher
from tests.support import cpu
from tests.support.models import ALL_FIXTURES, fixture_path

PARAMS = [
    SamplingParams(max_tokens=40, ignore_eos=True),
    SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.9, top_p=0.95, seed=3),
]


@pytest.mark.parametrize("name", [*ALL_FIXTURES, "llama-int4-b128"])
def test_the_engine_measures_one_row_rounding_as_measured_for_this_cpu_family(name: str) -> None:
    family = cpu.family()
    precision = name.split("-", 1)[1]  # int4, int8, int4-b128 (blocks of 128)
    if (family, precision) not in cpu.ONE_ROW_MATCHES:
        pytest.fail(
            f"no measured expectation for {family} at {precision}: measure one-row vs two-row passes "
            "(bench/kernel_rows.py) and add it to tests/support/cpu.py and docs/engine.md"
        )
    engine = Engine(fixture_path(name))
    expected = cpu.ONE_ROW_MATCHES[family, precision]
    assert engine.even_rows == (not expected), (
        f"{family}, {precision}: the engine measured that an odd pass's rows {'differ from' if expected else 'match'} "
        "an even pass's, unlike what was measured before: re-measure (bench/kernel_rows.py) and update "
        "tests/support/cpu.py and docs/engine.md"
    )


@pytest.mark.parametrize("name", ["llama-int4", "qwen3-int8", "phi3-int4-pruned"])
def test_a_filler_row_never_changes_the_real_rows_tokens(name: str) -> None:
    # Guarantee: BATCH_EXACT. The filler path (forced here whatever the CPU) gives the tokens of a
    # batch, and, where one row and many round alike, the tokens of one-row decoding too.
    one_row = Engine(fixture_path(name))
    filler = Engine(fixture_path(name))
    filler.even_rows = True
    prompts = [one_row.prompt_ids(t) for t in ("The quick brown fox", "a", "Grüße aus Köln 🎉")]
    for params in PARAMS:
        with_filler = [filler.generate(ids, params).token_ids for ids in prompts]
        batcher = Batcher(filler, max_batch=1)  # one sequence at a time: every pass gets a filler row
        assert [c.token_ids for c in batcher.generate_all([(ids, params) for ids in prompts])] == with_filler
        if not one_row.even_rows:
            assert [one_row.generate(ids, params).token_ids for ids in prompts] == with_filler
    assert batcher.passes > 0 and all(len(t) == 40 for t in with_filler)  # positive control
