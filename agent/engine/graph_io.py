"""The names, shapes and element types of a decoder graph's inputs and outputs, checked against its config.

Also which of three lm_heads the export has: every row's logits, the last row's only
(onnxruntime-genai's ``prune_lm_head``), or the last ``num_logits_to_keep`` rows of a pass
(``models.logits_rows``, ``models.convert``'s default).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.engine.model_folder import ModelFolder
from edge_contract.errors import ModelConfigError

#: The graph input a row-keeping export takes (``models.logits_rows``; Hugging Face's name).
LOGITS_TO_KEEP = "num_logits_to_keep"

_ORT_TYPES: dict[str, npt.DTypeLike] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,  # calibrated int8 cache (models.kv_quant)
}


class GraphIO:
    """Names, shapes and types of the graph's inputs and outputs, checked against the config."""

    def __init__(self, folder: ModelFolder, session: ort.InferenceSession) -> None:
        decoder = folder.config.model.decoder
        inputs = {i.name: i for i in session.get_inputs()}
        inputs.update({i.name: i for i in session.get_overridable_initializers()})
        outputs = {o.name: o for o in session.get_outputs()}

        def need(names: dict[str, Any], name: str, kind: str) -> str:
            if name not in names:
                raise ModelConfigError(
                    f"{folder.path}: genai_config.json names {kind} {name!r}, which {folder.onnx_path.name} lacks"
                )
            return name

        self.layers = decoder.num_hidden_layers
        self.kv_heads = decoder.num_key_value_heads
        self.head_size = decoder.head_size
        self.input_ids = need(inputs, decoder.inputs.input_ids, "input")
        self.attention_mask = need(inputs, decoder.inputs.attention_mask, "input")
        self.position_ids = (
            need(inputs, decoder.inputs.position_ids, "input")
            if decoder.inputs.position_ids and decoder.inputs.position_ids in inputs
            else None
        )
        self.logits = need(outputs, decoder.outputs.logits, "output")
        self.past_names = [
            (
                need(inputs, decoder.inputs.past_key_names % i, "input"),
                need(inputs, decoder.inputs.past_value_names % i, "input"),
            )
            for i in range(self.layers)
        ]
        self.present_names = [
            (
                need(outputs, decoder.outputs.present_key_names % i, "output"),
                need(outputs, decoder.outputs.present_value_names % i, "output"),
            )
            for i in range(self.layers)
        ]
        past = inputs[self.past_names[0][0]]
        self.kv_dtype = _dtype(past.type, past.name)
        kv_shape = past.shape
        if isinstance(kv_shape[1], int) and kv_shape[1] != self.kv_heads:
            raise ModelConfigError(
                f"{folder.path}: num_key_value_heads is {self.kv_heads} but {past.name} has {kv_shape[1]} heads"
            )
        if isinstance(kv_shape[3], int) and kv_shape[3] != self.head_size:
            raise ModelConfigError(
                f"{folder.path}: head_size is {self.head_size} but {past.name} has {kv_shape[3]}"
            )
        out = outputs[self.logits]
        self.logits_dtype = _dtype(out.type, out.name)
        vocab = out.shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else folder.config.model.vocab_size
        # Three kinds of export: the lm_head takes the last ``num_logits_to_keep`` rows of a pass
        # (``models.logits_rows``, ``models.convert``'s default), the last row only (onnxruntime-genai's
        # ``prune_lm_head``), or every row.
        self.logits_to_keep: str | None = LOGITS_TO_KEEP if LOGITS_TO_KEEP in inputs else None
        self._pruned_logits = self.logits_to_keep is None and out.shape[1] == 1

    @property
    def keeps_rows(self) -> bool:
        """Whether a pass can ask for its last ``n`` rows' logits (``num_logits_to_keep``)."""
        return self.logits_to_keep is not None

    @property
    def verifies(self) -> bool:
        """Whether a pass can return every row's logits (speculation verifies drafts with them)."""
        return not self._pruned_logits

    def prefill_logits_rows(self, prompt_tokens: int, *, even: bool = False) -> int:
        """Rows of logits a prefill chunk of ``prompt_tokens`` returns (its last is the next token's).

        A row-keeping export computes one, or two where the engine pairs rows (``even``: the
        lm_head's rows then round as in the full-logits export's even pass, ``agent.engine.rows``).
        """
        if self.keeps_rows:
            return min(prompt_tokens, 2 if even else 1)
        return 1 if self._pruned_logits else prompt_tokens


def _dtype(ort_type: str, name: str) -> npt.DTypeLike:
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise ModelConfigError(
            f"{name} has element type {ort_type}, which the engine does not support"
        ) from None
