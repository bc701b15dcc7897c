"""Where the pipeline gets a model's layers from: the model-source protocol.

The compression driver (:func:`moei2.pipeline.compress_source`) touches a model's weights only
through a source, so that a model held in memory and a checkpoint streamed from disk one layer
at a time (``moei2.streaming.StreamedSource``) go through the same code.

Protocol (attributes and methods every source has; see :class:`ModelSource`):

``model``
    the transformers causal LM. For a streamed source a skeleton on the meta device whose layers
    are materialised on demand.
``adapter``
    the :class:`moei2.models.MoEAdapter` of ``model``, built once.
``streamed``
    True when layers live on disk and changes made to a layer are lost once its scope ends.
``device``, ``dtype``
    where layers compute and in which dtype (float32 on the CPU unless asked otherwise, the
    model's dtype on a GPU).
``fingerprint() -> str``
    configuration plus router weights hash, so that a resumable work_dir is never shared by two
    different models.
``outer()``
    context manager: embeddings, rotary embedding, final norm and head resident on ``device`` for
    the scope.
``layer(i)``
    context manager yielding decoder layer ``i`` (the module at ``model.model.layers[i]``) resident
    on ``device`` in ``dtype``. Several layers may be resident at once. Whatever must survive
    (pruning, low-rank experts, writing the layer out, the hidden state it produces) happens inside
    the scope.
``outer_tensors() -> dict``
    the non-layer tensors (embeddings, final norm, head) under their state-dict keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Iterator, Union

import torch
from torch import nn

from .dtypes import resolve_dtype

__all__ = ["ModelSource", "InMemorySource", "as_device", "check_device", "compute_dtype", "run_fingerprint"]


def as_device(device) -> torch.device:
    """``device`` as a torch device with its index made explicit; a ValueError naming the argument
    otherwise.

    ``torch.device("cuda")`` and the ``cuda:0`` that every tensor on it reports compare unequal,
    so a value stored under one and looked up under the other is missed. Every device the package
    keeps is normalised here: an accelerator without an index gets the current one (0 when the
    backend is not available, so the result does not depend on the machine for the default)."""
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if device.index is None and device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        current = 0
        try:
            if backend is not None and backend.is_available():
                current = backend.current_device()
        except (AttributeError, RuntimeError):
            pass
        device = torch.device(device.type, current)
    return device


def check_device(device, dtype=None) -> torch.device:
    """The normalised ``device`` once it is known to exist on this machine and to compute in
    ``dtype``; a ValueError naming what is missing otherwise. Called before a model loads, so that
    a typo or a machine without the accelerator fails in a second, not after the load."""
    device = as_device(device)
    dtype = resolve_dtype(dtype)
    if device.type in ("cpu", "meta"):
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and callable(getattr(backend, "is_available", None)) and backend.is_available()
    if not available:
        raise ValueError(f"device: {device.type!r} was asked for, but this machine (torch {torch.__version__}) has "
                         f"no {device.type} device available")
    count = backend.device_count()
    if device.index >= count:
        raise ValueError(f"device: {device} does not exist: this machine has {count} {device.type} device(s) "
                         f"(indices 0 to {count - 1})")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device.index)
            raise ValueError(f"dtype: {name} ({device}) cannot compute in bfloat16; use float16 or float32")
    if device.type == "mps" and dtype == torch.float64:
        raise ValueError("dtype: the mps device cannot compute in float64; use float32")
    return device


def compute_dtype(device: torch.device, requested, stored: torch.dtype) -> torch.dtype:
    """The dtype layers compute in: as requested; else float32 on the CPU (where half-precision
    matmuls are slow and the C core works in float32 anyway) and the stored dtype elsewhere."""
    requested = resolve_dtype(requested)
    if requested is not None:
        return requested
    return torch.float32 if device.type == "cpu" else stored


class ModelSource:
    """Base of the model sources; documents the protocol (see the module docstring)."""

    model: nn.Module
    adapter: object
    streamed: bool = False
    device: torch.device
    dtype: torch.dtype

    def fingerprint(self) -> str:
        """:func:`run_fingerprint` of the model's configuration and router weights."""
        return run_fingerprint(self.model.config, (view.router_weight for view in self.adapter.moe_layers()))

    def outer(self):
        raise NotImplementedError

    def layer(self, index: int):
        raise NotImplementedError

    def outer_tensors(self) -> dict:
        raise NotImplementedError


def run_fingerprint(config, router_weights) -> str:
    """sha256 (16 hex digits) of a model's configuration and router weights, so that a resumable
    work_dir is never shared by two models: the JSON of ``config.to_dict()`` with sorted keys, then
    each MoE layer's router weight as float32 bytes, in layer order. Two checkpoints of one
    architecture differ in their routers, which are small to read."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for weight in router_weights:
        digest.update(_router_bytes(weight))
    return digest.hexdigest()[:16]


def _router_bytes(weight: torch.Tensor) -> bytes:
    t = weight.detach().to("cpu")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.contiguous().numpy().astype("float32", copy=False).tobytes()


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _home(module: nn.Module):
    for p in module.parameters():
        return p.device, p.dtype
    return None, None


class InMemorySource(ModelSource):
    """A model already in memory. Layers are moved to ``device`` and cast to ``dtype`` for their
    scope and put back (device and dtype) when it ends, with any change made inside kept."""

    streamed = False

    def __init__(self, model: nn.Module, *, device: Union[str, torch.device] = "cpu", dtype=None, adapter=None):
        from .models import get_adapter

        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.device = as_device(device)
        self.storage_dtype = _model_dtype(model)
        self.dtype = compute_dtype(self.device, dtype, self.storage_dtype)

    def _outer_modules(self) -> list[nn.Module]:
        layers = self.adapter.layers_module
        inside = {id(m) for m in layers.modules()}
        return [m for m in self.model.children() if id(m) not in inside and m is not self.model.model] + [
            m for m in self.model.model.children() if m is not layers]

    @contextlib.contextmanager
    def outer(self) -> Iterator[None]:
        # The outer modules keep their dtype: the embedding output is cast to the compute dtype
        # by the runner, so the stored model is never changed by the scope.
        moved = []
        try:
            for m in self._outer_modules():
                device, _ = _home(m)
                if device is not None and device != self.device:
                    m.to(self.device)
                    moved.append((m, device))
            yield
        finally:
            for m, device in moved:
                m.to(device)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        module = self.adapter.layers_module[index]
        device, dtype = _home(module)
        changed = device is not None and (device != self.device or dtype != self.dtype)
        if changed:
            module.to(device=self.device, dtype=self.dtype)
        try:
            yield module
        finally:
            if changed:
                # Read the live module: pruning and low-rank experts replace parameters in place.
                self.adapter.layers_module[index].to(device=device, dtype=dtype)

    def outer_tensors(self) -> dict:
        prefix = "model.layers."
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
