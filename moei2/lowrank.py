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


def _weight_array(W, name):
    if isinstance(W, np.ndarray):
        arr = W
    else:
        try:
            arr = np.asarray(W)
        except Exception as exc:  # pragma: no cover - numpy's own message is kept
            raise TypeError(f"{name} must be a 2-D float32 or float64 array, got {type(W).__name__}") from exc
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    # Only read: a copy of a non-contiguous or read-only input is fine.
    return np.ascontiguousarray(arr)


def _gram_array(gram, n, name, cache):
    if gram is None:
        return None
    key = id(gram)
    if cache is not None and key in cache:
        return cache[key][1]
    arr = gram if isinstance(gram, np.ndarray) else np.asarray(gram)
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float64 (or float32, converted), got {arr.dtype}")
    if arr.ndim != 2 or arr.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}) to match the {n} columns of W, got {arr.shape}")
    converted = np.ascontiguousarray(arr, dtype=np.float64)
    if cache is not None:
        cache[key] = (gram, converted)  # keeps `gram` alive, so its id cannot be reused meanwhile
    return converted


def _rank_value(rank, name):
    if rank is None:
        raise TypeError(f"{name} is required")
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(rank).__name__} {rank!r}")
    return int(rank)


def _output_array(out, index, shape, dtype, name):
    if out is None:
        return np.empty(shape, dtype=dtype)
    arr = out[index]
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of W ({np.dtype(dtype)}), got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous: it is written in place")
    if not arr.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is written in place")
    return arr


def _prepare(W, gram, rank, out, where, cache):
    w = _weight_array(W, f"{where}W")
    m, n = w.shape
    r = _rank_value(rank, f"{where}rank")
    if not 1 <= r <= min(m, n):
        raise ValueError(f"{where}rank must be in [1, min(m, n)] = [1, {min(m, n)}] for W of shape {w.shape}, got {r}")
    g = _gram_array(gram, n, f"{where}gram", cache)
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"{where}out must be a pair (A, B) of preallocated arrays, got {type(out).__name__}")
    a = _output_array(out, 0, (m, r), w.dtype, f"{where}out[0] (A)")
    b = _output_array(out, 1, (r, n), w.dtype, f"{where}out[1] (B)")
    return w, g, r, a, b


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
    w, g, r, a, b = _prepare(W, gram, rank, out, "", None)
    raw = _core.lowrank_decompose(w, g, r, a, b, skip_solvers=int(_skip_solvers))
    return (a, b, _info(raw)) if return_info else (a, b)


def _item_fields(item, index):
    where = f"items[{index}]: "
    if isinstance(item, dict):
        unknown = set(item) - {"W", "weight", "gram", "rank"}
        if unknown:
            raise ValueError(f"items[{index}] has unknown keys {sorted(unknown)}; use W (or weight), gram, rank")
        if ("W" in item) == ("weight" in item):
            raise ValueError(f"items[{index}] must have exactly one of the keys 'W' and 'weight'")
        if "rank" not in item:
            raise ValueError(f"items[{index}] has no 'rank'")
        return item.get("W", item.get("weight")), item.get("gram"), item["rank"], where
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return item[0], item[1], item[2], where
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
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an integer or None, got {type(num_threads).__name__}")
    if not 1 <= num_threads <= 4096:
        raise ValueError(f"num_threads must be in [1, 4096], got {num_threads}")
    if isinstance(items, (np.ndarray, str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"items must be an iterable of (W, gram, rank) tuples, got {type(items).__name__}")
    cache = {}
    prepared = []
    for index, item in enumerate(items):
        W, gram, rank, where = _item_fields(item, index)
        prepared.append(_prepare(W, gram, rank, None, where, cache))
    if not prepared:
        return []
    raws = _core.lowrank_decompose_many([tuple(p) for p in prepared], int(num_threads),
                                        skip_solvers=int(_skip_solvers))
    if return_info:
        return [(p[3], p[4], _info(raw)) for p, raw in zip(prepared, raws)]
    return [(p[3], p[4]) for p in prepared]


def _shape_arrays(shapes, count):
    try:
        arr = np.asarray(shapes)
    except Exception as exc:
        raise TypeError(f"shapes must be a sequence of (m, n) integer pairs, got {type(shapes).__name__}") from exc
    if arr.ndim == 1 and arr.shape == (2,):
        arr = np.broadcast_to(arr, (count, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"shapes must be a sequence of (m, n) pairs (or one pair for all), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"shapes must hold integers, got dtype {arr.dtype}")
    if arr.shape[0] != count:
        raise ValueError(f"shapes must have one (m, n) per expert: {count} importances, {arr.shape[0]} shapes")
    if (arr < 1).any():
        raise ValueError("shapes must be positive")
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
    if imp.ndim != 1:
        raise ValueError(f"importance must be 1-dimensional, got shape {imp.shape}")
    imp = np.ascontiguousarray(imp, dtype=np.float64)
    if imp.size == 0:
        raise ValueError("importance must not be empty")
    if not np.isfinite(imp).all():
        raise ValueError("importance contains NaN or Inf")
    if (imp < 0).any():
        raise ValueError(f"importance must be >= 0, got {imp.min()!r}")
    rows, cols = _shape_arrays(shapes, imp.size)
    avg_rank = _positive_real(avg_rank, "avg_rank")
    keep_ratio = _positive_real(keep_ratio, "keep_ratio")
    alpha = _positive_real(alpha, "alpha")
    eps = _positive_real(eps, "eps")
    if alpha is None or eps is None:
        raise TypeError("alpha and eps must be real numbers")
    return _core.allocate_ranks(imp, rows, cols, avg_rank, keep_ratio, alpha, eps)
