"""What every stage shares: the run's context, layer forwards over all calibration batches."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


def _libc_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hands the heap's free pages back to the operating system (glibc's malloc_trim; a no-op
    elsewhere). A layer's work frees gigabytes in pieces of a few megabytes (factors, expert
    activations, the C pool's per-thread scratch), which glibc keeps in its arenas; the next
    layer's allocations are not always served from them, so without this the resident set grew
    by about a gigabyte over ten layers."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def to_numpy(t, dtype=np.float32) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(t, dtype=dtype)


def batch_token_counts(num_sequences: int, batch_size: int, seq_len: int) -> list[int]:
    full, rest = divmod(num_sequences, batch_size)
    return [batch_size * seq_len] * full + ([rest * seq_len] if rest else [])


class Timer:
    """Accumulated wall time per stage name; a stage may be timed in several pieces."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - started


@dataclass
class Context:
    """One compression run: the source, its adapter (built once), the settings and the runner.

    ``torch_kernels``: candidate outputs, Grams and factors are computed in torch on the source's
    device (the accelerator path, ``config.kernels``); otherwise the C core computes them on the host.
    """

    source: object
    config: object
    runner: object
    input_ids: torch.Tensor
    batches: list
    batch_sizes: list
    state: object
    timer: Timer = field(default_factory=Timer)
    torch_kernels: bool = False
    progress: bool = True
    park_dtype: Optional[torch.dtype] = None
    where: str = "the start"  # the work in progress, for an error message

    def park(self, module) -> None:
        """Puts a resident, unmodified layer in ``park_dtype`` until it computes."""
        if self.park_dtype is not None:
            module.to(self.park_dtype)

    @contextlib.contextmanager
    def computing(self, module):
        """``module`` in the compute dtype for the scope, and parked in ``park_dtype`` after it.

        The layers of a KT block stay resident through the search and the KT walk, but only one
        computes at a time: the others wait in the dtype the checkpoint stores them in, which
        holds their (unmodified) values exactly, so a block costs one layer in float32 plus the
        rest at half that size. Only unmodified layers are parked."""
        if self.park_dtype is None:
            yield module
            return
        module.to(self.source.dtype)
        try:
            yield module
        finally:
            module.to(self.park_dtype)

    @property
    def adapter(self):
        return self.source.adapter

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def row_slices(self) -> list:
        """The rows of each calibration batch in a layer's flattened [tokens, H] statistics."""
        seq_len = int(self.input_ids.shape[1])
        return [slice(b.start * seq_len, b.stop * seq_len) for b in self.batches]

    def view(self, index: int, module):
        return self.adapter.view(index, module)

    def embed(self) -> torch.Tensor:
        """The hidden state entering the first decoder layer, all sequences; also records the
        arguments the model passes its layers for every batch shape (needs ``source.outer()``)."""
        ids = self.input_ids
        first = self.runner.embed(ids[self.batches[0]])
        hidden = torch.empty((ids.shape[0], ids.shape[1], first.shape[-1]), dtype=first.dtype, device=first.device)
        hidden[self.batches[0]] = first
        for b in self.batches[1:]:
            hidden[b] = self.runner.embed(ids[b])
        return hidden

    def run(self, index: int, module, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` (the resident ``module``) on every calibration batch."""
        out = torch.empty_like(hidden)
        with torch.no_grad():
            for b in self.batches:
                out[b] = self.runner.run(index, hidden[b], layer=module)
        return out

    def capture(self, index: int, module, hidden: torch.Tensor, *, grams: bool, keep_outputs: bool):
        """Statistics of MoE layer ``index`` on ``hidden`` (and its outputs when ``keep_outputs``)."""
        from ..calibrate import _capture_layer

        with torch.no_grad():
            return _capture_layer(self.runner, self.adapter, index, hidden, self.batches, grams, keep_outputs,
                                  module=module, keep_y=False,
                                  x_device=self.device if self.torch_kernels else "cpu")


class LayerProgress:
    """A pass's bar over its decoder layers, counted in calibration tokens: tqdm then shows the
    tokens per second through the layers (on the device, where they compute) and the time left,
    which at 262,144 tokens a layer is what a long run needs to show."""

    def __init__(self, layers: int, tokens_per_layer: int, desc: str):
        from tqdm.auto import tqdm

        self.tokens_per_layer = tokens_per_layer
        self.layers = layers
        self.done = 0
        self.bar = tqdm(total=layers * tokens_per_layer, desc=desc, unit="tok", unit_scale=True,
                        postfix=f"layer 0/{layers}")

    def update(self, layers: int = 1) -> None:
        self.done += layers
        self.bar.set_postfix_str(f"layer {self.done}/{self.layers}", refresh=False)
        self.bar.update(layers * self.tokens_per_layer)

    def close(self) -> None:
        self.bar.close()


def progress_bar(ctx: Context, total: int, desc: str):
    if not ctx.progress:
        return None
    return LayerProgress(total, int(ctx.input_ids.numel()), desc)
