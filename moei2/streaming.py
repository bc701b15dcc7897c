"""A model read from a Hugging Face checkpoint directory one decoder layer at a time.

The models moei2 exists for (Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite, Mixtral-8x7B: 28-93 GB) do not fit
in memory next to the work the compression does. :class:`StreamedSource` builds the transformers model
as a skeleton on the meta device (shapes, no weights) and materialises, on request, one decoder layer
(or the embeddings, final norm and head) from the safetensors shards::

    src = StreamedSource.open("Qwen1.5-MoE-A2.7B", device="cpu")     # checks everything up front
    with src.outer():                                                # embeddings, rotary, norm, head
        hidden = src.model.model.embed_tokens(ids)
        position_embeddings = src.model.model.rotary_emb(hidden, position_ids)
    for i in range(src.adapter.num_hidden_layers):
        with src.layer(i) as layer:                                  # layer i on src.device in src.dtype
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)[0]
        # layer i is back on the meta device, its memory returned

Reading. Tensors are read with plain positioned reads into freshly allocated tensors, never through a
memory map: a held map keeps every touched page in the resident set, and a long run touches the
whole checkpoint. Page-cache pages are not resident memory of the process and the kernel drops them
under pressure.

Layout. Real checkpoints store each routed expert separately (``mlp.experts.{j}.gate_proj.weight``,
``up_proj``, ``down_proj``; Mixtral ``block_sparse_moe.experts.{j}.w1/w3/w2``) while transformers 5
fuses them at load time into ``experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and
``experts.down_proj`` [E, H, I] (its ``conversion_mapping``: ``MergeModulelist(dim=0)`` then
``Concatenate(dim=1)``). The generic converter works on a whole state dict; here the same fusion is
done per layer, into one preallocated tensor per fused parameter, one expert at a time, so a layer
costs its own size plus one expert matrix. A checkpoint already holding fused tensors is read as is.
The result equals ``from_pretrained`` bit for bit (tested for all five families).

Checks. :meth:`StreamedSource.open` reads ``config.json``, the index and every shard's header (not
the data) and raises before any long work for: a directory that is not a model, a missing
``config.json``, a missing shard, an index naming tensors its shard does not hold, a tensor the model
needs that no shard holds or one with the wrong shape, an unsupported architecture, and a checkpoint
moei2 already compressed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch import nn

from .checkpoint import LAYER_PREFIX, PRETRAINED_INDEX as INDEX_NAME, PRETRAINED_SINGLE as SINGLE_NAME  # noqa: F401
from .checkpoint import Checkpoint, CheckpointError, check_stored_tensor
from .source import ModelSource, as_device, compute_dtype, run_fingerprint

__all__ = ["StreamedSource", "CheckpointError", "INDEX_NAME", "SINGLE_NAME"]


class _Direct:
    """A model tensor stored under one checkpoint key."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def sources(self):
        return [self.key]


class _Fused:
    """A fused expert tensor ``[E, rows, cols]`` built from per-expert matrices.

    ``groups`` is a list of per-expert key lists concatenated along dim 1 (``gate_up_proj``: gate
    keys then up keys; ``down_proj``: the down keys alone)."""

    __slots__ = ("groups",)

    def __init__(self, groups):
        self.groups = groups

    def sources(self):
        return [k for group in self.groups for k in group]


_FUSED_SOURCES = {
    # model parameter -> per-expert names in the checkpoint, per naming scheme
    "gate_up_proj": (("gate_proj.weight", "up_proj.weight"), ("w1.weight", "w3.weight")),
    "down_proj": (("down_proj.weight",), ("w2.weight",)),
}


def _candidates(key: str, stored_names: Optional[dict] = None) -> list[str]:
    """Checkpoint names a model key may be stored under (Mixtral's checkpoints say ``block_sparse_moe``;
    ``stored_names``: the adapter's renames, model-key suffix -> stored suffix; ERNIE 4.5's keep the
    router's correction bias beside the router, not in it)."""
    out = [key]
    if ".mlp." in key:
        out.append(key.replace(".mlp.", ".block_sparse_moe."))
    for model_suffix, stored_suffix in (stored_names or {}).items():
        if key.endswith("." + model_suffix):
            out.append(key[:-len(model_suffix)] + stored_suffix)
    if ".gate.moe_statics." in key:
        out.append(key.replace(".gate.moe_statics.", ".moe_statics."))
    return out


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, *, parameter: bool) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if parameter:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


def _rotary_embeddings(inner: nn.Module) -> dict:
    """The model's rotary embeddings by attribute name (``rotary_emb``; LFM2's ``pos_emb``): their
    tables are not stored, so the streamed model rebuilds them from the config."""
    return {name: module for name, module in inner.named_children()
            if name == "rotary_emb" or type(module).__name__.endswith("RotaryEmbedding")}


def _to_meta(module: nn.Module) -> None:
    """Replaces every parameter and buffer by a meta tensor of the same shape, dropping the storage."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for attr, b in list(sub._buffers.items()):
            if b is not None and b.device.type != "meta":
                sub._buffers[attr] = torch.empty_like(b, device="meta")


class StreamedSource(ModelSource):
    """A causal LM whose weights stay on disk until a layer is asked for; see the module docstring.

    Attributes: ``model`` (the skeleton on the meta device), ``adapter`` (its :class:`moei2.models.MoEAdapter`),
    ``streamed`` (True), ``device``, ``dtype`` (the compute dtype), ``directory``, ``storage_dtype``
    (the dtype most tensors are stored in), ``checkpoint_bytes`` (the size of the weight files).
    """

    streamed = True

    def __init__(self, *args, **kwargs):
        raise TypeError("use StreamedSource.open(directory, device=..., dtype=...)")

    # ---- opening and its checks ----

    @classmethod
    def open(cls, directory, *, device="cpu", dtype=None) -> "StreamedSource":
        """Opens a Hugging Face checkpoint directory (``config.json`` plus ``model.safetensors.index.json``
        and its shards, or one ``model.safetensors``) and checks it; nothing is read beyond headers.

        device: where layers are materialised and compute. dtype: the compute dtype (default float32 on
        the CPU, the checkpoint's dtype elsewhere). Raises FileNotFoundError (no such directory, no
        config.json, no weights, a missing shard) or :class:`CheckpointError` (a ValueError) naming the
        file or tensor at fault.
        """
        from .models import get_adapter

        checkpoint = Checkpoint.open_pretrained(directory)
        device = as_device(device)
        config = checkpoint.model_config()
        dtype = compute_dtype(device, dtype, checkpoint.storage_dtype)
        # As from_pretrained records it: the in-memory fingerprint hashes the whole config dict.
        config._name_or_path = str(directory)
        model = checkpoint.skeleton(dtype, config)
        model.eval()

        self = object.__new__(cls)
        self.checkpoint = checkpoint
        self.directory = checkpoint.directory
        self.model = model
        self.adapter = get_adapter(model)
        self.device = device
        self.dtype = dtype
        self.storage_dtype = checkpoint.storage_dtype
        self.checkpoint_bytes = checkpoint.checkpoint_bytes()
        self._tied = model.get_output_embeddings() is not None and (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        self._plan = self._make_plan()
        unstored = [f"{LAYER_PREFIX}{i}.{n}" for i, layer in enumerate(model.model.layers)
                    for n, _ in layer.named_buffers() if f"{LAYER_PREFIX}{i}.{n}" not in self._plan]
        if unstored:
            raise CheckpointError(f"{type(model).__name__}: decoder layers hold buffers the checkpoint does not store "
                                  f"({unstored[:3]}); such layers cannot be streamed")
        self._pristine: dict[int, nn.Module] = {}
        return self

    def _make_plan(self) -> dict:
        """``{model state-dict key: _Direct | _Fused}`` for every tensor the model needs; raises naming
        the first tensor no shard holds or whose stored shape differs from the model's."""
        plan, missing = {}, []
        state = self.model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        persistent = {k for k in shapes if not k.startswith("model.rotary_emb.")}
        for key in sorted(persistent):
            if key == "lm_head.weight" and self._tied and key not in self.checkpoint.weight_map:
                continue
            entry = None
            for name in _candidates(key, self.adapter.stored_names):
                if name in self.checkpoint.weight_map:
                    entry = _Direct(name)
                    break
            if entry is None:
                prefix, _, param = key.rpartition(".")
                if param in _FUSED_SOURCES and prefix.endswith(".experts"):
                    entry = self._fused_entry(prefix, param, shapes[key][0])
            if entry is None:
                missing.append(key)
                continue
            self._check_stored(key, entry, shapes[key], state[key].is_floating_point())
            plan[key] = entry
        if missing:
            raise CheckpointError(f"{self.directory}: {len(missing)} tensor(s) the model needs are in no weights file, "
                                  f"e.g. {missing[:3]}")
        used = {src for entry in plan.values() for src in entry.sources()}
        unused = sorted(k for k in self.checkpoint.weight_map if k not in used and not k.endswith(".rotary_emb.inv_freq"))
        if unused:
            # A config.json that declares fewer layers or experts than the weights hold would
            # otherwise build a smaller model from part of the weights.
            raise CheckpointError(f"{self.directory}: {len(unused)} stored tensor(s) have no place in the model "
                                  f"config.json describes ({self.adapter.num_hidden_layers} layers), e.g. "
                                  f"{unused[:3]}; config.json does not match the weights")
        return plan

    def _fused_entry(self, prefix: str, param: str, num_experts: int) -> Optional[_Fused]:
        for base in _candidates(prefix):
            for names in _FUSED_SOURCES[param]:
                groups = [[f"{base}.{j}.{n}" for j in range(num_experts)] for n in names]
                found = [k in self.checkpoint.weight_map for g in groups for k in g]
                if all(found):
                    return _Fused(groups)
                if any(found):
                    absent = next(k for g in groups for k in g if k not in self.checkpoint.weight_map)
                    raise CheckpointError(f"{self.directory}: expert tensor {absent!r} is in no weights file")
        return None

    def _check_stored(self, key: str, entry, shape: tuple, floating: bool) -> None:
        layout = "the model built from config.json"
        if isinstance(entry, _Direct):
            check_stored_tensor(self.checkpoint.file_of(entry.key), entry.key, self.checkpoint.tensor(entry.key), shape, floating,
                                layout=layout, error=CheckpointError)
            return
        num_experts, rows, cols = shape
        per_group = rows // len(entry.groups)
        for group in entry.groups:
            for k in group:
                check_stored_tensor(self.checkpoint.file_of(k), k, self.checkpoint.tensor(k), (per_group, cols), floating,
                                    layout=layout, error=CheckpointError)

    # ---- reading ----

    def _read(self, entries: dict) -> dict:
        """``{model key: tensor on device in dtype}`` for ``{model key: plan entry}``; each file is opened
        once and closed before returning."""
        by_file: dict[str, list] = {}
        for key, entry in entries.items():
            for src in entry.sources():
                by_file.setdefault(self.checkpoint.weight_map[src], []).append(src)
        out = {}
        for key, entry in entries.items():
            if isinstance(entry, _Fused):
                num_experts = len(entry.groups[0])
                first = self.checkpoint.tensor(entry.groups[0][0])
                rows, cols = first.shape
                out[key] = torch.empty((num_experts, rows * len(entry.groups), cols), dtype=self.dtype,
                                       device=self.device)
        # One pass over the files in name order, reading each needed tensor in file order.
        where = {}
        for key, entry in entries.items():
            if isinstance(entry, _Direct):
                where[entry.key] = (key, None)
            else:
                for g, group in enumerate(entry.groups):
                    for j, src in enumerate(group):
                        where[src] = (key, (g, j))
        # Expert matrices are read through one reused buffer: they are copied into the fused
        # tensor at once, and a fresh allocation each would fault in its pages again.
        scratch = None
        for name in sorted(by_file):
            file = self.checkpoint.files[name]
            wanted = sorted(by_file[name], key=lambda k: file.tensors[k].start)
            with file.reader() as read:
                for src in wanted:
                    key, slot = where[src]
                    if slot is not None and scratch is None:
                        scratch = torch.empty(max(self.checkpoint.tensor(k).nbytes for e in entries.values()
                                                  if isinstance(e, _Fused) for k in e.sources()), dtype=torch.uint8)
                    tensor = read(src, scratch if slot is not None else None)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        place = (f"layer {key[len(LAYER_PREFIX):].split('.')[0]}" if key.startswith(LAYER_PREFIX)
                                  else "outside the decoder layers")
                        raise CheckpointError(f"{file.path}: tensor {src!r} ({place}) holds NaN or infinite values; "
                                              "the checkpoint is corrupt")
                    if slot is None:
                        out[key] = tensor.to(device=self.device, dtype=self.dtype)
                    else:
                        g, j = slot
                        rows = tensor.shape[0]
                        out[key][j, g * rows:(g + 1) * rows].copy_(tensor)
                    del tensor
        return out

    def _materialise(self, module: nn.Module, prefix: str) -> None:
        names = [(n, True) for n, _ in module.named_parameters(recurse=True)]
        names += [(n, False) for n, _ in module.named_buffers(recurse=True) if f"{prefix}{n}" in self._plan]
        entries = {f"{prefix}{n}": self._plan[f"{prefix}{n}"] for n, _ in names}
        tensors = self._read(entries)
        for n, parameter in names:
            _set_tensor(module, n, tensors.pop(f"{prefix}{n}"), parameter=parameter)

    # ---- the protocol ----

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer ``i`` materialised on ``device`` in ``dtype`` for the scope; at exit its tensors
        are dropped (back on the meta device) and the module at ``model.model.layers[i]`` is the
        unmodified skeleton again, so pruning or low-rank factors applied inside are lost."""
        import operator

        i = operator.index(i)
        layers = self.model.model.layers
        if not 0 <= i < len(layers):
            raise IndexError(f"layer index {i} out of range: the model has {len(layers)} layers")
        if i in self._pristine:
            raise RuntimeError(f"layer {i} is already materialised (nested layer({i}) scopes)")
        # The copy shares the model's config object, as the layer it stands in for does.
        self._pristine[i] = copy.deepcopy(layers[i], memo={id(self.model.config): self.model.config})
        live = layers[i]
        try:
            self._materialise(live, f"{LAYER_PREFIX}{i}.")
            yield live
        finally:
            _to_meta(live)
            layers[i] = self._pristine.pop(i)

    @contextlib.contextmanager
    def outer(self) -> Iterator[nn.Module]:
        """Embeddings, rotary embedding (rebuilt: its buffers are not stored), final norm and head
        resident on ``device`` in ``dtype`` for the scope; yields the model."""
        model = self.model
        inner = model.model
        old_rotary = _rotary_embeddings(inner)
        parts = {name: mod for name, mod in model.named_children() if name != "model"}
        parts.update({f"model.{name}": mod for name, mod in inner.named_children()
                      if name != "layers" and name not in old_rotary})
        try:
            for prefix, module in parts.items():
                if self._tied and module is model.get_output_embeddings():
                    continue
                self._materialise(module, f"{prefix}.")
            if self._tied:
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
            for name, old in old_rotary.items():
                with torch.device("cpu"):
                    rotary = type(old)(config=model.config)
                setattr(inner, name, rotary.to(self.device))
            yield model
        finally:
            for module in parts.values():
                _to_meta(module)
            if self._tied:
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
            for name, old in old_rotary.items():
                setattr(inner, name, old)

    def outer_tensors(self) -> dict:
        """The tensors outside the decoder layers (embeddings, final norm, head), as stored, under
        their state-dict keys; a tied head is not stored and not returned."""
        entries = {k: e for k, e in self._plan.items() if not k.startswith(LAYER_PREFIX)}
        out = {}
        by_file: dict[str, list] = {}
        for key, entry in entries.items():
            by_file.setdefault(self.checkpoint.weight_map[entry.key], []).append(key)
        for name, keys in sorted(by_file.items()):
            with self.checkpoint.files[name].reader() as read:
                for key in keys:
                    out[key] = read(entries[key].key)
        return out

    def fingerprint(self) -> str:
        """:func:`moei2.source.run_fingerprint` of the configuration and the router weights, read
        from the shards without touching the experts: equal to the in-memory model's."""
        return run_fingerprint(self.model.config, self._router_weights())

    def _router_weights(self) -> Iterator[torch.Tensor]:
        for view in self.adapter.moe_layers():
            layer = self.model.model.layers[view.layer_index]
            router = view.adapter.router_linear(view.router)
            name = next(n for n, m in layer.named_modules() if m is router)
            src = self._plan[f"{LAYER_PREFIX}{view.layer_index}.{name}.weight"].key
            with self.checkpoint.files[self.checkpoint.weight_map[src]].reader() as read:
                yield read(src)

    def __repr__(self) -> str:
        return (f"StreamedSource({str(self.directory)!r}, {type(self.model).__name__}, "
                f"{self.adapter.num_hidden_layers} layers, device={self.device}, dtype={self.dtype})")
