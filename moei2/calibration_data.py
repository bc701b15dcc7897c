"""Calibration data: token windows cut from plain text, and the checks of the text and tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Plain ASCII: every usable tokenizer encodes and decodes it back, whatever its vocabulary.
_SAMPLE = "The quick brown fox jumps over the lazy dog. It was 1867, and 42 people agreed."


def check_tokenizer(tokenizer, argument: str = "tokenizer") -> None:
    """Refuses a tokenizer that would turn text into nonsense without an error: one that encodes a
    sample sentence to nothing (transformers builds such a tokenizer from a directory without
    tokenizer files), has no end-of-sequence id, or, where it has a vocabulary size and a decoder
    (any object with ``__call__`` and ``eos_token_id`` is accepted), a vocabulary under 2 tokens,
    ids outside it, or does not give the sample back. ValueError naming ``argument``."""
    eos = getattr(tokenizer, "eos_token_id", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        ids = [int(i) for i in tokenizer(_SAMPLE, add_special_tokens=False)["input_ids"]]
        text = tokenizer.decode(ids, skip_special_tokens=True) if ids and hasattr(tokenizer, "decode") else None
    except Exception as exc:  # any failure here means the tokenizer is unusable
        raise ValueError(f"{argument}: the tokenizer cannot encode and decode a sample sentence ({exc})") from None
    if not ids or (size is not None and size < 2):
        raise ValueError(f"{argument}: the tokenizer has no usable vocabulary (a sample sentence gives {len(ids)} ids"
                         f"{'' if size is None else f', {size} token(s)'}): are the tokenizer files missing?")
    if not isinstance(eos, int) or isinstance(eos, bool) or eos < 0 or (size is not None and eos >= size):
        raise ValueError(f"{argument}: the tokenizer has no end-of-sequence token id (eos_token_id={eos!r})")
    if min(ids) < 0 or (size is not None and max(ids) >= size):
        raise ValueError(f"{argument}: the tokenizer gives ids outside its vocabulary of {size} tokens")
    if text is not None and " ".join(text.split()) != " ".join(_SAMPLE.split()):
        raise ValueError(f"{argument}: the tokenizer does not give a sample sentence back: {_SAMPLE!r} became "
                         f"{text[:80]!r}")


def read_text_file(path, argument: str) -> str:
    """The text of ``path``, which must be a UTF-8 text file holding some text; ValueError naming
    ``argument`` otherwise (a binary file is refused, not read with replacement characters)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{argument}: {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{argument}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise ValueError(f"{argument}: {str(path)!r} holds NUL bytes at character {text.index(chr(0))}: a binary "
                         "file, not text")
    if not text.strip():
        raise ValueError(f"{argument}: {str(path)!r} holds no text")
    return text


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
    check_tokenizer(tokenizer)
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
