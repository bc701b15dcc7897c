"""Optional LoRA recovery fine-tuning of a compressed model (peft)."""
from __future__ import annotations

import time

import numpy as np

from .config import LoRAConfig


def lora_finetune(model, tokenizer, texts, config: LoRAConfig | None = None, *, seed: int = 0) -> dict:
    """Fine-tunes LoRA adapters on ``texts`` with the causal-LM loss, then (by default) merges them.

    The model is changed in place: with ``config.merge`` the adapters are folded into the base
    weights, so the result is a plain model of the same structure. Returns a small report: steps,
    first and last losses, time.
    """
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA recovery needs peft: pip install 'moei2[eval]'") from exc
    from .data import calibration_windows

    config = config or LoRAConfig()
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.target_modules if t in present]
    if not targets:
        raise ValueError(f"lora.target_modules: none of {list(config.target_modules)} exist in this model")
    windows = calibration_windows(tokenizer, texts, num_sequences=10**9, seq_len=config.seq_len, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    peft_model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                                  lora_dropout=config.dropout, target_modules=targets,
                                                  bias="none", task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    peft_model.train()
    losses = []
    started = time.perf_counter()
    for step in range(config.steps):
        idx = torch.randint(0, windows.shape[0], (config.batch_size,), generator=generator)
        batch = windows[idx].to(next(model.parameters()).device)
        out = peft_model(input_ids=batch, labels=batch)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LoRA loss became {loss.item()} at step {step}; lower lora.learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
    peft_model.eval()
    if config.merge:
        peft_model.merge_and_unload()
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": config.steps, "targets": targets, "loss_first": float(np.mean(head)),
            "loss_last": float(np.mean(tail)), "merged": config.merge,
            "time": time.perf_counter() - started, "windows": int(windows.shape[0])}
