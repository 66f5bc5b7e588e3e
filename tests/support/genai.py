"""onnxruntime-genai as the greedy reference (its own loop over the same model folder)."""

from __future__ import annotations

import onnxruntime_genai as og


def genai_greedy(model: og.Model, eos: frozenset[int], ids: list[int], new: int) -> list[int]:
    """The ``new`` greedy ids onnxruntime-genai generates after ``ids`` (a final eos dropped)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    out = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    if out and out[-1] in eos:
        out.pop()
    return out
