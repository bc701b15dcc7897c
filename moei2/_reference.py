"""Plain NumPy reference implementations of every C kernel, in float64.

These are the test oracles: written for clarity, not speed. The C kernels must match them.
"""
import numpy as np

# ==== lowrank reference =====================================================================


def decompose_reference(W, gram=None, rank=1, method="eigh"):
    """Rank-``rank`` minimiser of ||(W - A B) X^T||_F with G = X^T X, in float64.

    method="eigh": A = top-r eigenvectors of W G W^T (numpy.linalg.eigh), B = A^T W, and the loss
    is the square root of the sum of the discarded eigenvalues (each clipped at 0).
    method="whitened": SVD-LLM's form: a factor L with L L^T = G (Cholesky, or the symmetric
    square root V sqrt(max(lambda, 0)) V^T when G is singular), SVD of W L, A = U_r,
    B = U_r^T W (never an inverse of L), loss = sqrt(sum of the discarded sigma^2).
    gram=None means G = I. Returns (A, B, loss), all float64.
    """
    w = np.asarray(W, dtype=np.float64)
    m, n = w.shape
    g = np.eye(n) if gram is None else np.asarray(gram, dtype=np.float64)
    if method == "eigh":
        values, vectors = np.linalg.eigh(w @ g @ w.T)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        a = vectors[:, :rank]
        loss = float(np.sqrt(np.sum(np.clip(values[rank:], 0.0, None))))
    elif method == "whitened":
        try:
            factor = np.linalg.cholesky(g)
        except np.linalg.LinAlgError:
            lam, v = np.linalg.eigh(g)
            factor = (v * np.sqrt(np.clip(lam, 0.0, None))) @ v.T
        u, sigma, _ = np.linalg.svd(w @ factor, full_matrices=False)
        a = u[:, :rank]
        loss = float(np.sqrt(np.sum(sigma[rank:] ** 2)))
    else:
        raise ValueError(f"method must be 'eigh' or 'whitened', got {method!r}")
    return a, a.T @ w, loss


def weighted_residual_reference(W, A, B, gram=None):
    """||(W - A B) X^T||_F = sqrt(trace(D G D^T)) for D = W - A B, in float64 (G = I if None)."""
    d = np.asarray(W, dtype=np.float64) - np.asarray(A, dtype=np.float64) @ np.asarray(B, dtype=np.float64)
    if gram is None:
        return float(np.linalg.norm(d))
    return float(np.sqrt(max(np.sum((d @ np.asarray(gram, dtype=np.float64)) * d), 0.0)))


def allocate_ranks_reference(importance, shapes, avg_rank=None, keep_ratio=None, alpha=0.15, eps=1e-8):
    """MoE-I2 ranks, one unit at a time: floor of the shares, clamp to [1, cap], then +1 to the
    largest t_j - r_j below its cap (or -1 from the smallest above 1) until the sum is the budget
    round(R_avg * M); ties to the lower index."""
    imp = np.asarray(importance, dtype=np.float64)
    shapes = np.broadcast_to(np.asarray(shapes, dtype=np.int64), (imp.size, 2))
    count = imp.size
    caps = [max(1, int(m) * int(n) // (int(m) + int(n))) for m, n in shapes]
    if (avg_rank is None) == (keep_ratio is None):
        raise ValueError("give exactly one of avg_rank and keep_ratio")
    if avg_rank is None:
        avg_rank = keep_ratio * float(sum(int(m) * int(n) for m, n in shapes)) / float(sum(int(m) + int(n) for m, n in shapes))
    target = float(avg_rank) * count
    budget = int(np.floor(target + 0.5))
    if budget < count or budget > sum(caps):
        raise ValueError(f"budget {budget} outside [{count}, {sum(caps)}]")
    # Relative to the largest weight: the shares are unchanged, and this is how the C kernel
    # avoids overflow, so both floor the same float64 numbers.
    top = float(np.max(imp + eps))
    weights = [((x + eps) / top) ** alpha if top > 0 else 1.0 for x in imp]
    total = sum(weights)
    share = [wj / total * target for wj in weights]
    ranks = [min(max(int(np.floor(t)), 1), cap) for t, cap in zip(share, caps)]
    while sum(ranks) < budget:
        j = max((j for j in range(count) if ranks[j] < caps[j]), key=lambda j: (share[j] - ranks[j], -j))
        ranks[j] += 1
    while sum(ranks) > budget:
        j = min((j for j in range(count) if ranks[j] > 1), key=lambda j: (share[j] - ranks[j], j))
        ranks[j] -= 1
    return np.asarray(ranks, dtype=np.int64)


# ==== end lowrank reference =================================================================



# ==== search reference ======================================================================


# ==== end search reference ==================================================================
