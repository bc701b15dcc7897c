"""Calibration data: token windows cut from plain text."""
from __future__ import annotations

import numpy as np


def calibration_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int):
    """Cuts ``num_sequences`` windows of ``seq_len`` tokens from ``texts``.

    The texts are tokenised, joined with the EOS token, cut into non-overlapping windows, and
    windows are drawn without replacement with ``seed``. If the text holds fewer windows than asked,
    all of them are used (the report records how many).
    """
    import torch

    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("texts must hold at least one non-empty string")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        # verbose=False: whole documents exceed model_max_length, which is harmless here because
        # they are cut into seq_len windows, but the tokenizer would warn about it.
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(available, size=min(num_sequences, available), replace=False))
    windows = np.array(ids[: available * seq_len], dtype=np.int64).reshape(available, seq_len)[chosen]
    return torch.from_numpy(windows)
