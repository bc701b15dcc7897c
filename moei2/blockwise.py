"""Block-wise KT-reception field: choose per-layer candidates jointly over T consecutive layers.

For a block of T MoE layers with K candidate masks each, every one of the K^T combinations is
scored by running the real decoder layers (attention, norms, residuals) from the hidden state at
the block's start, and comparing the hidden state after the block's last layer with what the
unmodified block outputs from that state (which hidden state: docs/method.md, "Two passes").
Combinations share prefixes, so the evaluation walks the prefix tree depth first: layer t is run
once per prefix of length t, K + K^2 + ... + K^T layer passes instead of T * K^T. The pipeline
applies a candidate through the routing (:func:`moei2.stages.kt.masked_routing`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def make_blocks(layer_indices: Sequence[int], block_size: int) -> list[list[int]]:
    """Non-overlapping blocks of ``block_size`` consecutive MoE layers (the last may be shorter)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    layer_indices = list(layer_indices)
    return [layer_indices[i:i + block_size] for i in range(0, len(layer_indices), block_size)]


def search_block(
    num_candidates: Sequence[int],
    forward: Callable[[int, int, object], object],
    batches: Sequence[tuple[object, object]],
    distance: Callable[[object, object], float],
) -> tuple[np.ndarray, np.ndarray]:
    """Scores every combination of per-position candidates.

    num_candidates: candidates available at each of the T positions.
    forward(position, candidate, hidden) -> hidden: runs the block's layers at that position with
        that candidate applied (including any dense layers that follow it inside the block).
    batches: (hidden at the block's start, original hidden after the block) per calibration batch.
    distance(a, b): Frobenius norm of a - b for one batch.
    Returns (combinations [prod(K), T], losses [prod(K)]): the loss of a combination is the sum over
    batches of per-batch Frobenius norms, as everywhere in moei2.
    """
    num_candidates = [int(k) for k in num_candidates]
    if not num_candidates or min(num_candidates) < 1:
        raise ValueError(f"num_candidates must be a non-empty list of positive counts, got {num_candidates}")
    combos = np.array(np.meshgrid(*[np.arange(k) for k in num_candidates], indexing="ij")).reshape(
        len(num_candidates), -1).T
    index = {tuple(c): i for i, c in enumerate(combos.tolist())}
    losses = np.zeros(len(combos), dtype=np.float64)
    depth = len(num_candidates)

    for hidden_start, target in batches:
        def walk(position, prefix, hidden):
            for cand in range(num_candidates[position]):
                out = forward(position, cand, hidden)
                if position + 1 == depth:
                    losses[index[tuple(prefix + [cand])]] += float(distance(out, target))
                else:
                    walk(position + 1, prefix + [cand], out)

        walk(0, [], hidden_start)
    return combos, losses
