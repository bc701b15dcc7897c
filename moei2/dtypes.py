"""Dtype names: the one place a name such as ``"bfloat16"`` becomes a torch dtype and back.

Names are what configuration files, ``config.json``, ``moei2.json`` and the command line carry;
every reader resolves them here, so ``"bfloat16"``, ``"torch.bfloat16"`` and ``torch.bfloat16``
mean the same everywhere and an integer dtype is refused the same way everywhere.
"""
from __future__ import annotations

__all__ = ["COMPUTE_DTYPES", "dtype_name", "resolve_dtype", "torch_dtype"]

# The dtypes a model is loaded, computes and is saved in (CompressionConfig.dtype, --dtype).
COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")


def dtype_name(dtype) -> str:
    """``"float32"`` for ``torch.float32`` (and for the names ``"torch.float32"`` and ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(value, argument: str = "dtype"):
    """The torch dtype ``value`` names (a name, with or without ``torch.``, or a torch dtype), one
    of :data:`COMPUTE_DTYPES`; a ValueError naming ``argument`` for anything else (integer and
    float8 dtypes included: nothing computes in them)."""
    import torch

    found = getattr(torch, dtype_name(value), None) if isinstance(value, str) else value
    if not isinstance(found, torch.dtype) or dtype_name(found) not in COMPUTE_DTYPES:
        raise ValueError(f"{argument} must be one of {', '.join(COMPUTE_DTYPES)} (a name or a torch dtype), "
                         f"got {value!r}")
    return found


def resolve_dtype(value, argument: str = "dtype"):
    """:func:`torch_dtype`, with None (the caller's default) passed through."""
    return None if value is None else torch_dtype(value, argument)
