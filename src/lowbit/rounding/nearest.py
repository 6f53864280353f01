"""``nearest``: every weight to the nearest code of its block, blocks fitted independently."""

from __future__ import annotations

import torch

from lowbit.rounding.problem import Output, Problem
from lowbit.rounding.registry import register_rounding


def round_nearest(problem: Problem, out: Output) -> None:
    """Fit each block on its own weights, then round each weight to the nearest code.

    Works through rows in chunks of about `CHUNK_ELEMENTS` weights (fits run on float32
    copies: float16 ranges overflow and bfloat16 scales are too coarse).
    """
    lay = problem.blocks
    matrix = problem.matrix
    if matrix.numel() == 0:
        return
    if problem.spec.granularity == "tensor":
        blocks = matrix.reshape(1, -1).to(torch.float32)
        weights = None if problem.importance is None else problem.importance.reshape(1, -1)
        scale, zero, kept = problem.fit_blocks(blocks, weights)
        out.put_params(slice(None), scale, zero, kept)
        for r0, r1 in problem.row_chunks():
            out.put_codes(r0, r1, problem.encode(matrix[r0:r1], out.scale, out.zero_codes))
        return
    for r0, r1 in problem.row_chunks():
        rows = problem.complete_groups(matrix[r0:r1])
        blocks = rows.to(torch.float32).reshape(-1, lay.group_len)
        scale, zero, kept = problem.fit_blocks(blocks, problem.group_weights(r0, r1))
        out.put_params(slice(r0, r1), scale, zero, kept)
        codes = problem.encode(rows, out.scale[r0:r1], out.zero_codes[r0:r1])
        out.put_codes(r0, r1, codes)


register_rounding("nearest", round_nearest)
