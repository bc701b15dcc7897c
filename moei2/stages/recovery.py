"""Optional LoRA recovery of the compressed model (needs the whole model in memory)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recovery:
    """What :func:`moei2.lora.lora_finetune` reports (steps, losses, merged)."""

    report: dict


def recover(model, tokenizer, texts, config) -> Recovery:
    from ..lora import lora_finetune

    return Recovery(report=lora_finetune(model, tokenizer, texts, config.lora, seed=config.seed,
                                           device=config.device))
