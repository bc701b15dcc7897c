"""The bundled demo model and its text, installed as package data.

The model is a small Qwen2-MoE (``Qwen2MoeForCausalLM``) trained from scratch on Jane Austen's
novels by ``tools/train_demo.py`` (in the source tree); ``training_report.json`` next to its weights records the
run. Everything loads from the installed package, with no network access.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "calibration", "heldout")


def demo_model_path() -> Path:
    """Directory of the bundled model (config, float32 safetensors, tokenizer, training report)."""
    path = DATA_DIR / "demo_model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {path}; rebuild it with "
                                "tools/train_demo.py from the source tree or reinstall moei2")
    return path


def demo_model(dtype=None):
    """Loads the bundled demo MoE and its tokenizer offline: returns ``(model, tokenizer)``.

    ``dtype`` is a ``torch.dtype`` (default ``torch.float32``, the stored precision). The model is
    returned in eval mode on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    path = demo_model_path()
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


def demo_training_report() -> dict:
    """The bundled ``training_report.json``: held-out perplexity vs unigram, expert utilisation."""
    return json.loads((demo_model_path() / "training_report.json").read_text())
