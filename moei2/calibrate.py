"""Streamed calibration: one pass over the model, layer by layer, collecting each MoE layer's statistics.

All sequences are embedded first; then each decoder layer in turn is run over all sequences in
batches, with hooks on its MoE block (input X and output Y) and on its router (raw logits and the
model's own top-k choice). Only the hidden state of all sequences and ONE layer's statistics are
held at a time, so the memory needed beyond the model does not grow with the number of layers.

Decoder layers are called with exactly the arguments the model itself passes them (causal mask,
position ids, rotary embeddings, sliding-window masks), captured from the model's own forward, so
the per-layer results are those of the model whatever the family.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .models.base import as_index
from .source import as_device

__all__ = ["ExpertGrams", "LayerStats", "LayerRunner", "iter_layer_stats"]


@dataclass
class LayerStats:
    """Statistics of one MoE layer over all calibration tokens.

    ``X`` [N, H] float32 (float64 for a float64 layer): the MoE block's input (after attention and post_attention_layernorm),
    rows in sequence-major order (N = num_sequences * seq_len). ``router_logits`` [N, E] float32:
    raw router logits, before the softmax. ``Y`` [N, H] float32: the output of the ROUTED experts
    (the experts module's output, without shared experts), i.e. what pruning changes.
    ``top_k_index`` [N, top_k]: the experts the model chose. ``hidden_in``
    [num_sequences, seq_len, H]: the decoder layer's input, in the model's dtype. When Grams are
    requested for the layer: ``gram_in`` [E, H, H] float64 (sum of x x^T over the tokens routed to each
    expert), ``gram_down`` [E, I, I] float64 (the same for the down projection's input
    act(gate x) * (up x)), ``token_counts`` [E] (tokens routed to each expert).
    """

    layer_index: int
    X: torch.Tensor
    router_logits: torch.Tensor
    Y: torch.Tensor
    top_k_index: torch.Tensor
    hidden_in: torch.Tensor
    gram_in: Optional[torch.Tensor] = None
    gram_down: Optional[torch.Tensor] = None
    token_counts: Optional[torch.Tensor] = None


class _Stop(Exception):
    pass


class _RecordingLayer(nn.Module):
    """Stands in for a decoder layer during a capture pass: records its call, returns its input."""

    def __init__(self, index: int, record: dict, last: bool):
        super().__init__()
        self.index = index
        self.record = record
        self.last = last

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.record["embeddings"] = hidden_states
        self.record[self.index] = (args, {k: v for k, v in kwargs.items()
                                          if k not in ("past_key_values", "past_key_value", "use_cache")})
        if self.last:
            raise _Stop()
        return hidden_states


def _to_device(value, device, dtype=None):
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    return value


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class LayerRunner:
    """Runs a model's decoder layers one at a time on stored hidden states.

    The arguments the model passes each decoder layer are captured once per batch shape by
    running the model's forward with the decoder layers temporarily replaced by recorders (so the
    capture costs an embedding lookup and the mask and rotary set-up, not a forward pass).

    model: a supported causal LM; layers: its decoder layers (read live from
    ``model.model.layers`` if omitted); device: where layers run (each layer is moved there for
    its call and back afterwards if it lives elsewhere).
    """

    def __init__(self, model, decoder_layers=None, device=None, *, adapter=None, dtype=None):
        from .models import get_adapter

        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self._fixed_layers = list(decoder_layers) if decoder_layers is not None else None
        self.device = as_device(device) if device is not None else None
        # Layers may compute in another dtype than the model stores (float32 on the CPU): the
        # captured masks and rotary tables then follow the hidden state's dtype.
        self.dtype = dtype
        self._kwargs: dict[tuple, list] = {}

    @property
    def layers(self) -> list:
        return self._fixed_layers if self._fixed_layers is not None else self.adapter.decoder_layers

    def _capture(self, input_ids: torch.Tensor):
        container = self.adapter.layers_module
        originals = list(container)
        record: dict = {}
        embed_device = self.model.get_input_embeddings().weight.device
        try:
            for i in range(len(originals)):
                container[i] = _RecordingLayer(i, record, last=i == len(originals) - 1)
            with torch.no_grad():
                self.model(input_ids=input_ids.to(embed_device), use_cache=False)
        except _Stop:
            pass
        finally:
            for i, layer in enumerate(originals):
                container[i] = layer
        if any(i not in record for i in range(len(originals))):
            raise RuntimeError("could not capture the decoder layers' arguments from the model's forward pass")
        return record

    def _layer_kwargs(self, batch: int, seq_len: int, device, input_ids: Optional[torch.Tensor] = None):
        device = as_device(device)
        key = (batch, seq_len, device)
        if key not in self._kwargs:
            if input_ids is None:
                input_ids = torch.zeros((batch, seq_len), dtype=torch.long)
            record = self._capture(input_ids)
            self._kwargs[key] = [_to_device(record[i], device, self.dtype) for i in range(len(self.adapter.layers_module))]
        return self._kwargs[key]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state entering the first decoder layer, on the runner's device."""
        record = self._capture(input_ids)
        device = self.device or as_device(record["embeddings"].device)
        key = (input_ids.shape[0], input_ids.shape[1], device)
        if key not in self._kwargs:
            self._kwargs[key] = [_to_device(record[i], device, self.dtype) for i in range(len(self.adapter.layers_module))]
        return record["embeddings"].to(device=device, dtype=self.dtype)

    @contextlib.contextmanager
    def placed(self, index: int, device=None):
        """Keeps decoder layer ``index`` on ``device`` (default: the runner's) for the block's duration."""
        module = self.layers[index]
        device = as_device(device) if device is not None else self.device
        home = _module_device(module)
        moved = device is not None and home != device
        if moved:
            module.to(device)
        try:
            yield module
        finally:
            if moved:
                module.to(home)

    def run(self, index: int, hidden: torch.Tensor, layer=None) -> torch.Tensor:
        """Runs decoder layer ``index`` (or ``layer``, a stand-in for it, e.g. a pruned copy) on ``hidden``."""
        module = self.layers[index] if layer is None else layer
        args, kwargs = self._layer_kwargs(hidden.shape[0], hidden.shape[1], hidden.device)[index]
        home = _module_device(module)
        moved = home != hidden.device
        if moved:
            module.to(hidden.device)
        try:
            with torch.no_grad():
                out = module(hidden, *args, **kwargs)
        finally:
            if moved:
                module.to(home)
        return out[0] if isinstance(out, tuple) else out


def _check_input_ids(model, input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.LongTensor [num_sequences, seq_len], got {type(input_ids).__name__}")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must have dtype torch.long, got {input_ids.dtype}")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [num_sequences, seq_len] tensor, got shape {tuple(input_ids.shape)}")
    vocab = model.get_input_embeddings().weight.shape[0]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the vocabulary), got values in [{low}, {high}]")
    return input_ids


def iter_layer_stats(model, input_ids: torch.Tensor, *, grams=None, batch_size: int = 8,
                     device="cpu", progress: bool = True, desc: Optional[str] = None,
                     propagate: bool = True) -> Iterator[LayerStats]:
    """Streams :class:`LayerStats` of every MoE layer of ``model``, in layer order.

    model: a supported HF MoE causal LM (put in eval mode). input_ids: LongTensor
    [num_sequences, seq_len]. grams: ``None`` (no Grams), ``"all"`` (every MoE layer) or a set of
    layer indices: per-expert float64 Grams of the inputs of gate/up and of down, over the tokens
    the model routes to each expert. batch_size: sequences
    per forward call. device: where the layers run and the hidden states live. progress: a tqdm bar
    over the layers, titled ``desc``.

    propagate=True: the next layer's input is computed AFTER the consumer has handled the yielded
    statistics, so changes it makes to that layer (pruning, low-rank experts) reach later layers;
    this runs each MoE layer twice. propagate=False: the outputs of the capture pass are used (one
    run per layer); changes then affect only later passes.

    Dense layers are run but not yielded. Runs under ``torch.no_grad()``.
    """
    from .models import get_adapter

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = as_device(device)
    adapter = get_adapter(model)
    grams = _gram_layers(grams, adapter.moe_layer_indices)
    input_ids = _check_input_ids(model, input_ids)
    return _stream(model, adapter, input_ids, grams, batch_size, device, progress, desc, propagate)


def _gram_layers(grams, moe_layers) -> frozenset:
    """The set of MoE layers whose Grams are collected."""
    if grams is None:
        return frozenset()
    if isinstance(grams, str):
        if grams != "all":
            raise ValueError(f"grams must be None, 'all' or a set of MoE layer indices, got {grams!r}")
        return frozenset(moe_layers)
    try:
        items = list(grams)
    except TypeError:
        raise ValueError(f"grams must be None, 'all' or a set of MoE layer indices, got {type(grams).__name__}") from None
    out = set()
    for i in items:
        i = as_index(i, "grams: layer index")
        if i not in moe_layers:
            raise ValueError(f"grams: layer {i} is not an MoE layer of this model; MoE layers: {list(moe_layers)}")
        out.add(i)
    return frozenset(out)


def _stream(model, adapter, input_ids, grams, batch_size, device, progress, desc, propagate):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield from _stream_no_grad(model, adapter, input_ids, grams, batch_size, device, progress, desc, propagate)
    finally:
        if was_training:
            model.train()


def _stream_no_grad(model, adapter, input_ids, grams, batch_size, device, progress, desc, propagate):
    num_sequences, seq_len = input_ids.shape
    runner = LayerRunner(model, device=device)
    batches = [slice(s, min(s + batch_size, num_sequences)) for s in range(0, num_sequences, batch_size)]

    first = runner.embed(input_ids[batches[0]])
    hidden = torch.empty((num_sequences, seq_len, first.shape[-1]), dtype=first.dtype, device=device)
    hidden[batches[0]] = first
    del first
    for b in batches[1:]:
        hidden[b] = runner.embed(input_ids[b])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=adapter.num_hidden_layers, desc=desc or "calibration", unit="layer")
    try:
        for index in range(adapter.num_hidden_layers):
            layer = adapter.layers_module[index]
            if adapter.moe_block(layer) is None:
                hidden = _run_all(runner, index, hidden, batches)
            else:
                stats, outputs = _capture_layer(runner, adapter, index, hidden, batches, index in grams,
                                                keep_outputs=not propagate)
                yield stats
                del stats
                hidden = _run_all(runner, index, hidden, batches) if propagate else outputs
                del outputs
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _run_all(runner: LayerRunner, index: int, hidden: torch.Tensor, batches) -> torch.Tensor:
    out = torch.empty_like(hidden)
    with runner.placed(index, hidden.device):
        for b in batches:
            out[b] = runner.run(index, hidden[b])
    return out


def _capture_layer(runner, adapter, index, hidden, batches, grams, keep_outputs, *, module=None, keep_y=True,
                   x_device="cpu"):
    """One MoE layer's statistics over ``hidden``; with ``module`` (the resident decoder layer), the
    layer is run as it is, without moving it. ``x_device``: where X is kept (the pipeline keeps it
    on the compute device, so that candidate outputs are computed there)."""
    view = adapter.view(index, module)
    block, router = view.moe_module, view.router
    num_sequences, seq_len, hidden_size = hidden.shape
    num_tokens = num_sequences * seq_len
    num_experts, top_k = view.num_experts, view.top_k
    # float32 holds the inputs of float32, bfloat16 and float16 layers exactly (their Grams are
    # computed from X again by ExpertGrams); a float64 layer's need float64.
    x_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    X = torch.empty((num_tokens, hidden_size), dtype=x_dtype, device=x_device)
    Y = torch.empty((num_tokens, hidden_size), dtype=torch.float32) if keep_y else None
    logits = torch.empty((num_tokens, num_experts), dtype=torch.float32)
    chosen = torch.empty((num_tokens, top_k), dtype=torch.long)
    gram_in = gram_down = counts = None
    if grams:
        inter = view.intermediate_size
        gram_in = torch.zeros((num_experts, hidden_size, hidden_size), dtype=torch.float64, device=hidden.device)
        gram_down = torch.zeros((num_experts, inter, inter), dtype=torch.float64, device=hidden.device)
        counts = torch.zeros(num_experts, dtype=torch.long)
    outputs = torch.empty_like(hidden) if keep_outputs else None
    seen: dict = {}

    def block_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"] = x.reshape(-1, x.shape[-1])

    def experts_hook(module, args, output):
        y = adapter.routed_output(output, seen["x"].shape[0])
        seen["y"] = y.reshape(-1, y.shape[-1])

    def router_hook(module, args, output):
        choice = adapter.router_choice(output, top_k)
        if choice is None:
            raise RuntimeError(f"layer {index}: the router returned {type(output).__name__}, expected "
                               "(logits, top-k weights, top-k indices)")
        seen["logits"], seen["index"] = choice

    handles = [block.register_forward_pre_hook(block_hook, with_kwargs=True), router.register_forward_hook(router_hook),
               view.experts_module.register_forward_hook(experts_hook)]
    placement = runner.placed(index, hidden.device) if module is None else contextlib.nullcontext()
    try:
        with placement:
            for b in batches:
                seen.clear()
                out = runner.run(index, hidden[b], layer=module)
                if "x" not in seen or "logits" not in seen or "y" not in seen:
                    raise RuntimeError(f"layer {index}: the MoE block, its router or its experts were not called "
                                       "by the decoder layer")
                rows = slice(b.start * seq_len, b.stop * seq_len)
                X[rows] = seen["x"].to(device=X.device, dtype=X.dtype)
                if Y is not None:
                    Y[rows] = seen["y"].float().cpu()
                logits[rows] = seen["logits"].float().cpu()
                chosen[rows] = seen["index"].cpu()
                if keep_outputs:
                    outputs[b] = out
                if grams:
                    _accumulate_grams(view, seen["x"], seen["index"], gram_in, gram_down, counts)
    finally:
        for h in handles:
            h.remove()
    stats = LayerStats(layer_index=index, X=X, router_logits=logits, Y=Y, top_k_index=chosen, hidden_in=hidden,
                       gram_in=None if gram_in is None else gram_in.cpu(),
                       gram_down=None if gram_down is None else gram_down.cpu(), token_counts=counts)
    return stats, outputs


def _accumulate_grams(view, x, index, gram_in, gram_down, counts):
    """Adds one batch to the per-expert Grams, over the tokens the model routed to each expert."""
    tokens, bounds = _tokens_by_expert(index, gram_in.shape[0])
    weight_dtype = next(view.experts_module.parameters()).dtype
    for j in range(gram_in.shape[0]):
        n = bounds[j + 1] - bounds[j]
        if n == 0:
            continue
        counts[j] += n
        _add_expert_grams(view, j, x[tokens[bounds[j]:bounds[j + 1]]], gram_in[j], gram_down[j], weight_dtype)


def _tokens_by_expert(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list]:
    """The batch's tokens grouped by the expert they are routed to, ascending within each group:
    expert j's tokens are ``tokens[bounds[j]:bounds[j + 1]]``."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    bounds = [0]
    for n in counts:
        bounds.append(bounds[-1] + n)
    return order // index.shape[-1], bounds


@torch.no_grad()
def _add_expert_grams(view, j, rows, gram_in_j, gram_down_j, weight_dtype) -> None:
    """gram_in_j += x^T x and gram_down_j += h^T h over ``rows`` (the inputs routed to expert j).

    Without autograd: the expert weights require grad, and a graph through them would keep every
    batch's activations alive for as long as the Gram (gigabytes per expert at full calibration)."""
    x64 = view.expert_input(j, rows).to(torch.float64)
    gram_in_j.addmm_(x64.T, x64)
    # The down projection's input as the model computes it, in the experts' own dtype.
    h = view.intermediate(j, rows.to(weight_dtype)).to(torch.float64)
    gram_down_j.addmm_(h.T, h)


class ExpertGrams:
    """The Grams of one MoE layer's experts, one expert at a time, from its captured inputs.

    A layer's Grams at once take E (H^2 + I^2) float64 values: 3 GB for a Qwen1.5-MoE-A2.7B layer,
    13 GB for a Mixtral-8x7B layer's down projections alone. Computed per expert when needed, they
    take one expert's. The additions are those of ``iter_layer_stats(grams=...)`` in the same order
    (per calibration batch, tokens ascending), so the values are the same.

    ``view``: the layer as it is now (pruned or not; the routing in ``top_k_index`` must use its
    expert numbering). ``X`` [N, H] and ``top_k_index`` [N, top_k]: the captured inputs and the
    model's choices. ``row_slices``: the rows of each calibration batch, in order.
    """

    def __init__(self, view, X: torch.Tensor, top_k_index: torch.Tensor, row_slices):
        self.view = view
        self.X = X
        self.num_experts = int(view.num_experts)
        self._weight = next(view.experts_module.parameters())
        self._batches = []
        for rows in row_slices:
            tokens, bounds = _tokens_by_expert(top_k_index[rows], self.num_experts)
            # The token indices live where X does: a gather from a device tensor with host indices
            # copies them to the device on every call, for every expert and batch.
            self._batches.append((rows.start, tokens.to(X.device), bounds))

    def __call__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gram_in [H, H], gram_down [I, I]) of expert ``j``, float64 on the experts' device."""
        if not 0 <= j < self.num_experts:
            raise IndexError(f"expert {j} out of range: the layer has {self.num_experts} experts")
        H, inter = int(self.view.hidden_size), int(self.view.intermediate_size)
        device, dtype = self._weight.device, self._weight.dtype
        gram_in = torch.zeros((H, H), dtype=torch.float64, device=device)
        gram_down = torch.zeros((inter, inter), dtype=torch.float64, device=device)
        for start, tokens, bounds in self._batches:
            if bounds[j + 1] > bounds[j]:
                rows = self.X[start + tokens[bounds[j]:bounds[j + 1]]].to(device)
                _add_expert_grams(self.view, j, rows, gram_in, gram_down, dtype)
        return gram_in, gram_down
