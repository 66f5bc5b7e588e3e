"""The key/value cache: one buffer per request, shared by past and present.

onnxruntime's GroupQueryAttention writes the new keys and values in place when
its ``past_key`` input and ``present_key`` output are the same memory, so the
cache is allocated once per request, bound to both sides through IOBinding, and
never copied or concatenated between steps.

The buffer is sized to what the request can use (prompt + new tokens, capped
at the context), not to the full context: on a 4 GB box the difference between
the two is often the difference between fitting and not.  ``numpy.empty`` maps
the pages lazily, so memory is committed only as positions are written.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnxruntime as ort


class KVCache:
    """Per-layer key and value tensors ``[slots, kv_heads, capacity, head_size]`` in one block.

    A slot is one sequence's row of the batch dimension (one slot for a request run
    alone; ``agent.engine.batch`` shares a block of several).
    """

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_size: int,
        capacity: int,
        dtype: npt.DTypeLike,
        slots: int = 1,
    ) -> None:
        self.capacity = capacity
        self.slots = slots
        self.dtype = np.dtype(dtype)
        self._block = np.empty((layers, 2, slots, kv_heads, capacity, head_size), dtype=self.dtype)
        self.shape = (1, kv_heads, capacity, head_size)

    @property
    def block(self) -> npt.NDArray[np.generic]:
        """The whole cache, ``[layers, 2 (key, value), slots, kv_heads, capacity, head_size]``."""
        return self._block

    @property
    def nbytes(self) -> int:
        """Size of the whole cache in bytes (committed lazily, as it fills)."""
        return int(self._block.nbytes)

    def bind(
        self,
        binding: ort.IOBinding,
        past_names: list[tuple[str, str]],
        present_names: list[tuple[str, str]],
        *,
        first: int = 0,
        rows: int = 1,
    ) -> None:
        """Bind layer ``i``'s past and present key/value of slots ``first .. first + rows`` to the same memory."""
        shape = (rows, *self.shape[1:])
        for layer, ((past_k, past_v), (present_k, present_v)) in enumerate(
            zip(past_names, present_names, strict=True)
        ):
            for kind, past, present in ((0, past_k, present_k), (1, past_v, present_v)):
                view = self._block[layer, kind, first : first + rows]
                ptr = view.ctypes.data
                binding.bind_input(past, "cpu", 0, self.dtype, shape, ptr)
                binding.bind_output(present, "cpu", 0, self.dtype, shape, ptr)
