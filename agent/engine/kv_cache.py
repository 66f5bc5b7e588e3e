"""The key/value cache: one buffer per request, shared by past and present.

onnxruntime's GroupQueryAttention writes the new keys and values in place when
its ``past_key`` input and ``present_key`` output are the same memory, so the
cache is allocated once per request, bound to both sides through IOBinding, and
never copied or concatenated between steps.

The buffer is sized to what the request can use (prompt + new tokens, capped
at the context), not to the full context: on a 4 GB box the difference between
the two is often the difference between fitting and not.  The block is an
anonymous mapping whose pages are committed only as positions are written: not
``numpy.empty``, because numpy advises transparent huge pages for arrays of 4 MiB
and more, and then the first position written in each head's rows commits 2 MiB
at once (a head's rows of one slot are 0.3 MiB at Phi-3-mini's shape), so every
slot was resident in full from its first token: a filler slot
(``agent.engine.rows``) cost as much as a sequence (measured: docs/memory.md).
"""

from __future__ import annotations

import math
import mmap

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
        self._block = lazy_zeros((layers, 2, slots, kv_heads, capacity, head_size), self.dtype)
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


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> npt.NDArray[np.generic]:
    """A zeroed array in a private anonymous mapping of its own, committed page by page as it is written.

    Not advised for transparent huge pages (numpy advises them for its large arrays), so a
    write commits 4 KiB, not 2 MiB.  The mapping is released with the last view of the array.
    """
    count = math.prod(shape)
    region = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(region, dtype=dtype, count=count).reshape(shape)
