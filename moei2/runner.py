"""Runs a model's decoder layers one at a time on stored hidden states.

The call arguments each decoder layer receives inside the model (causal mask, position ids,
rotary embeddings, sliding-window masks) are captured once per batch shape by hooks on a real
forward pass, so re-running a layer reproduces exactly what the model computes, whatever the
family.
"""
from __future__ import annotations

import torch


class _Captured(Exception):
    pass


class LayerRunner:
    def __init__(self, model, decoder_layers):
        self.model = model
        self.layers = list(decoder_layers)
        self._kwargs: dict[tuple, list] = {}

    def _capture(self, batch_size: int, seq_len: int, device, dtype):
        key = (batch_size, seq_len, str(device), str(dtype))
        if key in self._kwargs:
            return self._kwargs[key]
        captured: list = [None] * len(self.layers)
        handles = []

        def make_hook(i):
            def hook(module, args, kwargs):
                captured[i] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                if i == len(self.layers) - 1:
                    raise _Captured()
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        dummy = torch.zeros((batch_size, seq_len), dtype=torch.long, device=device)
        try:
            with torch.no_grad():
                self.model(input_ids=dummy, use_cache=False)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in captured):
            raise RuntimeError("could not capture the decoder layers' arguments from a forward pass")
        self._kwargs[key] = captured
        return captured

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the first decoder layer."""
        hidden = {}

        def hook(module, args, kwargs):
            hidden["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Captured()

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return hidden["h"]

    def run(self, index: int, hidden: torch.Tensor, layer=None) -> torch.Tensor:
        """Runs decoder layer ``index`` (or ``layer``, a stand-in for it) on ``hidden``."""
        kwargs = self._capture(hidden.shape[0], hidden.shape[1], hidden.device, hidden.dtype)[index]
        module = self.layers[index] if layer is None else layer
        with torch.no_grad():
            out = module(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out
