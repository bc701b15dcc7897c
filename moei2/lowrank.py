"""Truncation-aware low-rank decomposition of expert weights, and importance-driven rank allocation.

For a weight ``W`` (m x n) whose inputs ``X`` (tokens x n) have the Gram ``G = X^T X``, the rank-r
``W' = A @ B`` minimising ``||(W - W') X^T||_F`` (SVD-LLM's objective) is ``U_r U_r^T W`` with
``U_r`` the top-r eigenvectors of ``W G W^T``. The C core computes exactly that in float64, with
no Cholesky factor and no inverse, so singular, rank-deficient and all-zero Grams (experts that are
rarely routed to) are ordinary input. ``A`` has orthonormal columns and ``B = A^T W``.

Functions:

* :func:`decompose`: one matrix.
* :func:`decompose_many`: a batch, one matrix per core, bitwise equal to calling
  :func:`decompose` on each item.
* :func:`allocate_ranks`: MoE-I2's per-expert ranks from expert importance.
"""
import numbers

import numpy as np

from . import _core

__all__ = ["decompose", "decompose_many", "allocate_ranks"]

_INFO_KEYS = ("loss", "energy", "min_eigenvalue", "max_eigenvalue", "method", "route", "solver", "fallback",
              "whitened", "gram_is_zero", "rank")


def _weight_array(W):
    # Only read: a copy of a non-contiguous or read-only input is fine. Every check of the
    # kernel's arguments, with the message a user sees, is the extension's (csrc/glue/glue_lowrank.c).
    return np.ascontiguousarray(W)


def _gram_array(gram, cache):
    """A float64 C-contiguous Gram (float32 is converted); a Gram shared by several items is
    converted once. Other dtypes pass through, to be refused by the extension."""
    if gram is None:
        return None
    key = id(gram)
    if cache is not None and key in cache:
        return cache[key][1]
    arr = np.asarray(gram)
    converted = np.ascontiguousarray(arr, dtype=np.float64) if arr.dtype in (np.float32, np.float64) else arr
    if cache is not None:
        cache[key] = (gram, converted)  # keeps `gram` alive, so its id cannot be reused meanwhile
    return converted


def _info(raw):
    info = {key: raw[key] for key in _INFO_KEYS}
    info["fallback"] = info["fallback"] or ""
    return info


def decompose(W, gram=None, rank=None, *, return_info=False, out=None, _skip_solvers=0):
    """Rank-``rank`` factors ``A`` (m x r), ``B`` (r x n) of ``W`` minimising ``||(W - A B) X^T||_F``.

    Args:
        W: float32 or float64 array of shape (m, n), any layout (read only).
        gram: ``X^T X`` (n x n) of the inputs that ``W`` multiplies, float64 (float32 is converted),
            symmetric positive semidefinite; singular and all-zero Grams are fine. ``None`` gives
            the plain truncated SVD (``G = I``).
        rank: integer in [1, min(m, n)].
        return_info: also return a dict describing the result (below).
        out: optional pair of preallocated C-contiguous writeable arrays ``(A, B)`` with W's dtype.

    Returns:
        ``(A, B)`` in W's dtype, or ``(A, B, info)``. ``A`` has orthonormal columns ordered by
        decreasing weighted singular value, ``B = A^T W``. ``info`` holds ``loss`` (the exact
        minimum ``||(W - A B) X^T||_F``: the square root of the discarded part of the spectrum of
        ``W G W^T``), ``energy`` (``||W X^T||_F``), ``min_eigenvalue``/``max_eigenvalue`` of the
        reduced problem, ``method`` (``route/solver``), ``route`` (``left-gram`` for m <= n, ``qr``
        for m > n), ``solver`` (the LAPACK eigensolver used), ``fallback`` (empty, or which
        solver failed and which one replaced it), ``whitened`` (False for the plain SVD),
        ``gram_is_zero`` and ``rank``.

    Raises:
        TypeError / ValueError naming the argument for bad input (dtype, shape, non-finite values,
        rank out of range, a gram that is not a Gram matrix).
    """
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"out must be a pair (A, B) of preallocated arrays, got {type(out).__name__}")
    a, b, raw = _core.lowrank_decompose(_weight_array(W), _gram_array(gram, None), rank,
                                        *(out if out is not None else (None, None)), skip_solvers=int(_skip_solvers))
    return (a, b, _info(raw)) if return_info else (a, b)


def _item_fields(item, index):
    if isinstance(item, dict):
        unknown = set(item) - {"W", "weight", "gram", "rank"}
        if unknown:
            raise ValueError(f"items[{index}] has unknown keys {sorted(unknown)}; use W (or weight), gram, rank")
        if ("W" in item) == ("weight" in item):
            raise ValueError(f"items[{index}] must have exactly one of the keys 'W' and 'weight'")
        if "rank" not in item:
            raise ValueError(f"items[{index}] has no 'rank'")
        return item.get("W", item.get("weight")), item.get("gram"), item["rank"]
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return item[0], item[1], item[2]
    raise TypeError(f"items[{index}] must be a (W, gram, rank) tuple or a dict with W, gram, rank; "
                    f"got {type(item).__name__}")


def _default_threads():
    from ._threads import num_threads

    return num_threads()


def decompose_many(items, *, return_info=False, num_threads=None, _skip_solvers=0):
    """:func:`decompose` for many matrices at once, one matrix per thread.

    Args:
        items: iterable of ``(W, gram, rank)`` tuples, or dicts with keys ``W`` (or ``weight``),
            ``gram`` (optional) and ``rank``; each as in :func:`decompose`. Items may share a
            Gram (it is converted to float64 once).
        return_info: return ``(A, B, info)`` per item instead of ``(A, B)``.
        num_threads: worker threads (default: the CPUs this process may use). The GIL is released
            and BLAS runs single-threaded meanwhile; the caller's BLAS thread count is restored.

    Returns:
        A list with one result per item, in order, bitwise equal to what :func:`decompose` gives
        for that item alone.
    """
    if num_threads is None:
        num_threads = _default_threads()
    if isinstance(items, (np.ndarray, str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"items must be an iterable of (W, gram, rank) tuples, got {type(items).__name__}")
    cache = {}
    prepared = []
    for index, item in enumerate(items):
        W, gram, rank = _item_fields(item, index)
        prepared.append((_weight_array(W), _gram_array(gram, cache), rank))
    if not prepared:
        return []
    results = _core.lowrank_decompose_many(prepared, num_threads, skip_solvers=int(_skip_solvers))
    if return_info:
        return [(a, b, _info(raw)) for a, b, raw in results]
    return [(a, b) for a, b, _ in results]


def _shape_arrays(shapes, count):
    try:
        arr = np.asarray(shapes)
    except Exception as exc:
        raise TypeError(f"shapes must be a sequence of (m, n) integer pairs, got {type(shapes).__name__}") from exc
    if arr.size == 0:  # no experts: refused with the importance, by the extension
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if arr.ndim == 1 and arr.shape == (2,):
        arr = np.broadcast_to(arr, (count, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"shapes must be a sequence of (m, n) pairs (or one pair for all), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"shapes must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])


def _positive_real(value, name):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def allocate_ranks(importance, shapes, avg_rank=None, keep_ratio=None, alpha=0.15, eps=1e-8):
    """Per-expert ranks from importance, as in MoE-I2.

    ``r_j = floor(w_j / sum(w) * R_avg * M)`` with ``w_j = (I_j + eps)^alpha``, clamped to
    ``[1, floor(m_j n_j / (m_j + n_j))]`` (beyond that cap the factors hold more parameters than
    the dense matrix); then the budget ``round(R_avg * M)`` is met exactly, the units left over by
    flooring going one at a time to the largest remaining fractional shares (ties to the lower
    index), or, when clamping up to 1 overshot, taken from the smallest.

    Args:
        importance: M non-negative finite importances (float64 or convertible).
        shapes: M pairs (m_j, n_j), or one pair for every expert.
        avg_rank: R_avg, the average rank. Exactly one of ``avg_rank`` and ``keep_ratio``.
        keep_ratio: fraction in (0, 1] of the dense parameters sum(m_j n_j) to keep, i.e.
            ``R_avg = keep_ratio * sum(m_j n_j) / sum(m_j + n_j)``; 1 keeps every parameter the
            caps allow (the budget is then at most the sum of the caps).
        alpha: exponent (0 gives uniform ranks), eps: added to every importance.

    Returns:
        int64 array of M ranks summing to the budget.
    """
    try:
        imp = np.asarray(importance)
    except Exception as exc:
        raise TypeError(f"importance must be a 1-D array of numbers, got {type(importance).__name__}") from exc
    if imp.dtype == np.bool_ or not (np.issubdtype(imp.dtype, np.floating) or np.issubdtype(imp.dtype, np.integer)):
        raise TypeError(f"importance must hold real numbers, got dtype {imp.dtype}")
    # Values, sizes and the budget are checked once, by the extension (csrc/glue/glue_lowrank.c).
    imp = np.ascontiguousarray(imp, dtype=np.float64)
    rows, cols = _shape_arrays(shapes, imp.shape[0] if imp.ndim == 1 else 1)
    avg_rank = _positive_real(avg_rank, "avg_rank")
    keep_ratio = _positive_real(keep_ratio, "keep_ratio")
    alpha = _positive_real(alpha, "alpha")
    eps = _positive_real(eps, "eps")
    if alpha is None or eps is None:
        raise TypeError("alpha and eps must be real numbers")
    return _core.allocate_ranks(imp, rows, cols, avg_rank, keep_ratio, alpha, eps)
