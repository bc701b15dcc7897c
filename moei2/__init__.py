"""moei2: compress Mixture-of-Experts language models with MoE-I2.

Inter-expert pruning (importance, layer-wise genetic search, block-wise KT-reception field) and
intra-expert truncation-aware low-rank decomposition, with the heavy kernels in C.
"""
from ._loader import load_core as _load_core

_core = _load_core()

__version__ = "0.1.0"


def blas_info():
    """Which BLAS/LAPACK moei2 is linked against.

    Returns a dict with ``route`` (how the build found it: ``environment``, ``pkg-config`` or
    ``scipy-openblas32``), ``config`` (OpenBLAS build string), ``corename`` (the CPU kernel set
    chosen at run time), ``num_threads`` (current BLAS threads) and ``num_procs``.
    """
    return dict(_core.blas_info())


def set_blas_threads(num_threads):
    """Set the number of BLAS threads; returns the previous value."""
    return _core.set_blas_threads(int(num_threads))


from .config import CompressionConfig, LoRAConfig  # noqa: E402  (pure Python, no heavy deps)
from . import lowrank  # noqa: E402  (NumPy and the core only)

# Names whose modules need torch/transformers are resolved on first use, so that
# `import moei2` works with the core install alone.
_LAZY = {
    "compress": ("moei2.pipeline", "compress"),
    "calibration_windows": ("moei2.calibration_data", "calibration_windows"),
    "lora_finetune": ("moei2.lora", "lora_finetune"),
    "save": ("moei2.io", "save"),
    "load": ("moei2.io", "load"),
    "is_moei2_checkpoint": ("moei2.io", "is_moei2_checkpoint"),
    "inspect_checkpoint": ("moei2.io", "inspect_checkpoint"),
    "export": ("moei2.export", "export"),
    "get_adapter": ("moei2.models", "get_adapter"),
    "prune_experts": ("moei2.models", "prune_experts"),
    "lowrank_experts": ("moei2.models", "lowrank_experts"),
    "iter_layer_stats": ("moei2.calibrate", "iter_layer_stats"),
    "demo_model": ("moei2.demo", "demo_model"),
    "demo_model_path": ("moei2.demo", "demo_model_path"),
    "demo_texts": ("moei2.demo", "demo_texts"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moei2' has no attribute {name!r}")


__all__ = ["blas_info", "set_blas_threads", "__version__", "CompressionConfig", "LoRAConfig", "lowrank", *_LAZY]
