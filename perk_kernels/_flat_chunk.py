"""The chunk a program of a flat-buffer kernel works on (``lora_inner_step``, ``meta_grad_accumulate``).

Both ops run a 1-D grid of (adapter, chunk) programs over the flat ``(n_adapters, P)`` buffers; the
chunks come from :func:`perk_kernels._utils.group_chunks` (rows ``[group, start, end, slot]``, never
across a group border).
"""

import triton
import triton.language as tl


@triton.jit
def flat_chunk(chunks_ptr, n_chunks, P, ALIGN: tl.constexpr):
    """(adapter, group, row start, start, end, slot) of this program's chunk; start/end are columns."""
    pid = tl.program_id(0).to(tl.int64)
    adapter = pid // n_chunks
    row = chunks_ptr + (pid - adapter * n_chunks) * 4
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    base = adapter * P  # int64: n_adapters·P may exceed 2³¹
    if ALIGN > 1:
        # Row starts and both chunk ends on whole vectors: lets the compiler use vector loads
        # (the tail mask is then constant per vector).
        start = tl.multiple_of(start, ALIGN)
        end = tl.multiple_of(end, ALIGN)
        base = tl.multiple_of(base, ALIGN)
    return adapter, tl.load(row), base, start, end, tl.load(row + 3)
