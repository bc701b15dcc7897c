"""The bundled demo models and their text, installed as package data.

Two small MoE models trained from scratch on Jane Austen's novels, with the same tokenizer, split
and training loop (``tools/train_demo.py`` in the source tree rebuilds them):

``"default"``  a Qwen2-MoE (``Qwen2MoeForCausalLM``): 16 routed experts, top-4, one gated shared expert.
``"fine"``     a miniature DeepSeek-V2-Lite (``DeepseekV2ForCausalLM``): 64 routed experts, top-6,
               2 shared experts, first layer dense; the fine-grained structure expert pruning targets.

``training_report.json`` next to each model's weights records its run. Everything loads from the
installed package, with no network access.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "calibration", "heldout")
DEMO_MODELS = {"default": "demo_model", "fine": "demo_fine"}  # name -> directory under data/


def demo_model_path(name: str = "default") -> Path:
    """Directory of a bundled model (config, float32 safetensors, tokenizer, training report)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"name: expected one of {sorted(DEMO_MODELS)}, got {name!r}")
    path = DATA_DIR / DEMO_MODELS[name]
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the bundled demo model {name!r} is missing from {path}; rebuild it with "
                                "tools/train_demo.py from the source tree or reinstall moei2")
    return path


def demo_model(dtype=None, name: str = "default"):
    """Loads a bundled demo MoE and its tokenizer offline: returns ``(model, tokenizer)``.

    ``name`` is ``"default"`` (the Qwen2-MoE) or ``"fine"`` (the 64-expert DeepSeek-V2 style
    model). ``dtype`` is a ``torch.dtype`` (default ``torch.float32``, the stored precision). The
    model is returned in eval mode on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    path = demo_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval(), tokenizer


def demo_texts(split: str = "calibration") -> list[str]:
    """Chapters of the bundled text split, one string per chapter.

    ``split`` is ``"train"`` (what the demo model was trained on), ``"calibration"`` (for
    compression) or ``"heldout"`` (for perplexity and the local zero-shot tasks); the three share
    no chapter.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    path = DATA_DIR / "texts" / f"austen_{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def demo_training_report(name: str = "default") -> dict:
    """A bundled model's ``training_report.json``: held-out perplexity vs unigram, expert utilisation."""
    return json.loads((demo_model_path(name) / "training_report.json").read_text())
