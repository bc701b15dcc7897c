"""The single-pass pipeline as it was before the staged driver: the oracle the driver is checked against.

Stages (docs/method.md):
  1a  expert importance (loss of dropping each expert alone) and per-layer prune counts;
  1b  layer-wise genetic search, K best masks per layer;
  1c  block-wise KT-reception field over T consecutive layers, with the real decoder layers;
  2   importance of the survivors, rank allocation, truncation-aware low-rank experts;
  3   optional LoRA recovery.
Each stage streams the calibration data layer by layer. With ``work_dir`` every finished layer is
recorded, and a rerun with the same settings, model and data resumes from there.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from typing import Optional

import numpy as np

from moei2.config import CompressionConfig
from moei2.data import calibration_windows
from moei2.state import RunState


# ---- helpers ------------------------------------------------------------------------------

def _to_numpy(t, dtype=np.float32):
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu")
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        t = t.numpy()
    return np.ascontiguousarray(t, dtype=dtype)


def _batch_token_counts(num_sequences: int, batch_size: int, seq_len: int) -> list[int]:
    full, rest = divmod(num_sequences, batch_size)
    return [batch_size * seq_len] * full + ([rest * seq_len] if rest else [])


def _model_fingerprint(model, adapter) -> str:
    """Config plus the router weights: two checkpoints of one architecture must not share a
    work_dir, and the routers are small yet differ between any two trained or seeded models."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for view in adapter.moe_layers():
        digest.update(_to_numpy(view.router_weight).tobytes())
    return digest.hexdigest()[:16]


def routed_expert_parameters(adapter) -> int:
    """Routed-expert parameters of a model, dense, pruned or low-rank."""
    return sum(view.routed_parameters() for view in adapter.moe_layers())


def _model_size(model) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return params, nbytes


class _Timer:
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


# ---- the pipeline -------------------------------------------------------------------------

def compress(model, tokenizer, texts, config: Optional[CompressionConfig] = None, *, work_dir=None,
             progress: bool = True):
    """Compresses ``model`` in place with MoE-I2 and returns ``(model, report)``.

    model: a supported Hugging Face MoE causal LM (see :func:`moei2.models.get_adapter`).
    tokenizer: its tokenizer. texts: calibration text (a string or a list of strings).
    config: :class:`CompressionConfig` (defaults from docs/method.md).
    work_dir: optional directory recording finished layers so an interrupted run resumes.
    The report (a JSON-serialisable dict) holds experts kept per layer, ranks, parameter and
    size reductions, each stage's loss and time, and the seed.
    """
    from moei2 import search as search_mod
    from moei2.calibrate import iter_layer_stats
    from moei2.models import get_adapter

    if config is None:
        config = CompressionConfig()
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a CompressionConfig, got {type(config).__name__}")
    timer = _Timer()
    started = time.perf_counter()
    adapter = get_adapter(model)
    model.eval()

    with timer("calibration_data"):
        input_ids = calibration_windows(tokenizer, texts, config.num_sequences, config.seq_len, config.seed)
    data_hash = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:16]
    state = RunState(work_dir, f"{config.fingerprint()}-{_model_fingerprint(model, adapter)}-{data_hash}")

    views = adapter.moe_layers()
    moe_layers = [v.layer_index for v in views]
    view_of = {v.layer_index: v for v in views}
    num_experts = {v.layer_index: int(v.num_experts) for v in views}
    top_k = {v.layer_index: int(v.top_k) for v in views}
    batch_sizes = _batch_token_counts(input_ids.shape[0], config.calib_batch_size, config.seq_len)
    params_before, bytes_before = _model_size(model)
    routed_before = routed_expert_parameters(adapter)

    report: dict = {
        "seed": config.seed,
        "config": config.to_dict(),
        "model": {"architecture": type(model).__name__, "family": adapter.family,
                  "num_hidden_layers": adapter.num_hidden_layers, "moe_layers": moe_layers,
                  "num_experts": num_experts, "top_k": top_k},
        "calibration": {"sequences": int(input_ids.shape[0]), "seq_len": int(config.seq_len),
                        "tokens": int(input_ids.numel()), "requested_sequences": config.num_sequences},
        "resumed": state.resumed,
        "layers": {str(l): {} for l in moe_layers},
    }

    def stats_stream(grams, desc, propagate):
        return iter_layer_stats(model, input_ids, grams=grams, batch_size=config.calib_batch_size,
                                device=config.device, progress=progress, desc=desc, propagate=propagate)

    def layer_for(stats, view, r_max):
        if not view.adapter.standard_experts:  # gpt-oss: the family's expert forward, in torch
            from moei2.stages.selection import candidate_outputs

            return search_mod.Layer.from_candidate_outputs(
                view.router_logits(stats.X).numpy(), candidate_outputs(view, stats.X), top_k=int(view.top_k),
                renormalize=bool(view.renormalize), scaling_factor=float(view.scaling_factor), r_max=r_max,
                batch_sizes=batch_sizes)
        return search_mod.Layer.from_moe(
            _to_numpy(stats.X), _to_numpy(view.router_weight), _to_numpy(view.gate_up_proj),
            _to_numpy(view.down_proj), top_k=int(view.top_k), renormalize=bool(view.renormalize),
            scaling_factor=float(view.scaling_factor), r_max=r_max, batch_sizes=batch_sizes, act=view.act)

    # ---- stage 1a: importance and prune counts ----
    dropped: dict[int, list[int]] = {}
    if config.prunes:
        importance = state.get("expert_importance", {})
        with timer("importance"):
            if len(importance) < len(moe_layers):
                for stats in stats_stream(None, "importance", propagate=False):
                    key = str(stats.layer_index)
                    if key in importance:
                        continue
                    layer = layer_for(stats, view_of[stats.layer_index], 1)
                    importance[key] = layer.expert_importance().tolist()
                    state.put("expert_importance", importance)
        layer_importance = np.array([sum(importance[str(l)]) for l in moe_layers])
        counts = search_mod.prune_counts(
            layer_importance, num_experts=[num_experts[l] for l in moe_layers],
            top_k=[top_k[l] for l in moe_layers], ratio=config.prune_ratio,
            total=config.prune_total, rule=config.prune_rule)
        counts = {l: int(c) for l, c in zip(moe_layers, counts)}
        for l in moe_layers:
            report["layers"][str(l)].update(importance=importance[str(l)],
                                            layer_importance=float(sum(importance[str(l)])),
                                            prune_count=counts[l])

        # ---- stage 1b + 1c: genetic search per layer, KT step per block ----
        from moei2.blockwise import make_blocks
        from moei2.calibrate import LayerRunner

        candidates = {int(k): v for k, v in state.get("candidates", {}).items()}
        chosen = {int(k): v for k, v in state.get("chosen", {}).items()}
        blocks = make_blocks(moe_layers, config.kt_block)
        block_of = {l: bi for bi, b in enumerate(blocks) for l in b}
        runner = LayerRunner(model, adapter.decoder_layers, device=config.device)
        block_start_hidden: dict[int, object] = {}
        kt_reports = state.get("blocks", {})
        with timer("search"):
            for stats in stats_stream(None, "genetic search", propagate=False):
                l = stats.layer_index
                block = blocks[block_of[l]]
                if l == block[0] and str(block_of[l]) not in kt_reports:
                    block_start_hidden[block_of[l]] = stats.hidden_in
                if l not in candidates:
                    r = counts[l]
                    if r == 0:
                        candidates[l] = {"masks": [[False] * num_experts[l]], "losses": [0.0],
                                         "history": {"best": [], "mean": []}, "evaluations": 0}
                    else:
                        candidates[l] = _select(config, layer_for(stats, view_of[l], r), stats, r, l)
                    state.put("candidates", {str(k): v for k, v in candidates.items()})
                if l == block[-1] and str(block_of[l]) not in kt_reports:
                    with timer("kt_block"):
                        kt_reports[str(block_of[l])] = _kt_block(
                            runner, adapter, block, candidates, block_start_hidden.pop(block_of[l]), config)
                    for l2, c in zip(block, kt_reports[str(block_of[l])]["choice"]):
                        chosen[l2] = c
                    state.put("blocks", kt_reports)
                    state.put("chosen", {str(k): v for k, v in chosen.items()})
        for l in moe_layers:
            mask = np.asarray(candidates[l]["masks"][chosen[l]], dtype=bool)
            dropped[l] = [int(j) for j in np.flatnonzero(mask)]
            report["layers"][str(l)].update(
                search={"candidates": candidates[l]["masks"], "candidate_losses": candidates[l]["losses"],
                        "history": candidates[l]["history"], "evaluations": candidates[l]["evaluations"],
                        "chosen_candidate": chosen[l]},
                dropped=dropped[l], kept=[j for j in range(num_experts[l]) if j not in dropped[l]])
        report["blocks"] = [kt_reports[str(i)] for i in range(len(blocks))]
        from moei2 import prune_experts

        prune_experts(model, {l: d for l, d in dropped.items() if d})
    else:
        for l in moe_layers:
            report["layers"][str(l)].update(dropped=[], kept=list(range(num_experts[l])))

    # ---- stage 2: low-rank experts ----
    if config.decomposes:
        from moei2 import lowrank_experts
        from moei2.lowrank import allocate_ranks, decompose_many

        adapter = get_adapter(model)
        views = {v.layer_index: v for v in adapter.moe_layers()}
        done_ranks = state.get("ranks", {})
        spectra = state.get("spectra", [])
        with timer("decomposition"):
            for stats in stats_stream("all" if config.whiten else None, "low-rank", propagate=True):
                l = stats.layer_index
                view = views[l]
                M = int(view.num_experts)
                saved = state.load_arrays(f"factors_layer{l}")
                if str(l) in done_ranks and saved is not None:
                    ranks = np.asarray(done_ranks[str(l)]["ranks"])
                    factors = _unpack_factors(saved, M)
                else:
                    if config.rank_rule == "uniform" or M <= view.top_k:
                        imp = np.ones(M)  # ranks do not depend on it: skip the removal losses
                    elif config.importance_on_pruned:
                        imp = layer_for(stats, view, 1).expert_importance()
                    else:
                        full = report["layers"][str(l)].get("importance")
                        kept = report["layers"][str(l)]["kept"]
                        imp = np.asarray(full)[kept] if full is not None else np.ones(M)
                    inter, hidden = int(view.intermediate_size), int(view.hidden_size)
                    # alpha = 0 makes every (I + eps)^alpha equal: the uniform-rank baseline.
                    alpha = config.alpha if config.rank_rule == "importance" else 0.0
                    ranks = allocate_ranks(np.asarray(imp, dtype=np.float64), [(inter, hidden)] * M,
                                           avg_rank=config.avg_rank, keep_ratio=config.rank_keep_ratio,
                                           alpha=alpha, eps=config.eps)
                    items = []
                    for j in range(M):
                        gate, up, down = (_to_numpy(w, np.float32) for w in view.expert(j))
                        if config.whiten:
                            gram_in = np.ascontiguousarray(_to_numpy(stats.gram_in[j], np.float64))
                            gram_down = np.ascontiguousarray(_to_numpy(stats.gram_down[j], np.float64))
                        else:
                            gram_in = gram_down = None
                        r = int(ranks[j])
                        items += [(gate, gram_in, r), (up, gram_in, r), (down, gram_down, r)]
                    if config.whiten and l in (moe_layers[0], moe_layers[-1]):
                        spectra.extend(_spectra(l, items[0][0], items[0][1], "gate", 0))
                    results = decompose_many(items, return_info=True)
                    factors = {j: {name: results[3 * j + i][:2] for i, name in enumerate(("gate", "up", "down"))}
                               for j in range(M)}
                    losses = [[float(results[3 * j + i][2]["loss"]) for i in range(3)] for j in range(M)]
                    fallbacks = [results[i][2].get("fallback") for i in range(len(results))
                                 if results[i][2].get("fallback")]
                    state.save_arrays(f"factors_layer{l}", _pack_factors(factors))
                    done_ranks[str(l)] = {"ranks": [int(r) for r in ranks], "importance": np.asarray(imp).tolist(),
                                          "losses": losses, "fallbacks": [str(f) for f in fallbacks]}
                    state.put("spectra", spectra)
                    state.put("ranks", done_ranks)
                lowrank_experts(model, {l: factors})
        report["spectra"] = spectra
        for l in moe_layers:
            if str(l) in done_ranks:
                report["layers"][str(l)]["lowrank"] = done_ranks[str(l)]

    # ---- stage 3: LoRA recovery ----
    if config.lora is not None:
        from moei2.recovery import lora_finetune

        with timer("lora"):
            report["lora"] = lora_finetune(model, tokenizer, texts, config.lora, seed=config.seed)

    params_after, bytes_after = _model_size(model)
    routed_after = routed_expert_parameters(get_adapter(model))
    report["parameters"] = {
        "routed_expert_before": routed_before, "routed_expert_after": routed_after,
        "routed_expert_reduction": 1.0 - routed_after / routed_before if routed_before else 0.0,
        "model_before": params_before, "model_after": params_after,
        "model_reduction": 1.0 - params_after / params_before,
        "model_bytes_before": bytes_before, "model_bytes_after": bytes_after,
        "model_gib_before": bytes_before / 2**30, "model_gib_after": bytes_after / 2**30,
    }
    report["times"] = dict(timer.times, total=time.perf_counter() - started)
    return model, report


def _select(config, layer, stats, r: int, layer_index: int) -> dict:
    """Stage 1b for one layer: candidate masks by the configured selection rule."""
    E = layer.num_experts
    if config.selection == "genetic":
        result = layer.genetic(r, k_best=config.kt_candidates, seed=config.seed + layer_index,
                               population=config.population, generations=config.generations,
                               elite_fraction=config.elite_fraction, mutation_rate=config.mutation_rate)
        return {"masks": np.asarray(result.masks).tolist(), "losses": np.asarray(result.losses).tolist(),
                "history": _history_dict(result), "evaluations": int(getattr(result, "evaluations", 0))}
    if config.selection == "greedy":
        result = layer.greedy(r)
        mask = np.asarray(result.masks)[0]
    else:
        mask = np.zeros(E, dtype=bool)
        if config.selection == "frequency":
            logits = _to_numpy(stats.router_logits)
            top = np.argsort(-logits, axis=1, kind="stable")[:, : layer.top_k]
            frequency = np.bincount(top.ravel(), minlength=E)
            mask[np.argsort(frequency, kind="stable")[:r]] = True
        else:  # random
            rng = np.random.default_rng(config.seed + layer_index)
            mask[rng.choice(E, size=r, replace=False)] = True
    loss = float(np.asarray(layer.loss(mask[None, :])).ravel()[0])
    return {"masks": [mask.tolist()], "losses": [loss], "history": {"best": [], "mean": []}, "evaluations": 1}


def _spectra(layer: int, weight: np.ndarray, gram: np.ndarray, matrix: str, expert: int) -> list:
    """Singular values of one weight, plain and whitened by its input Gram (for the report)."""
    w = weight.astype(np.float64)
    plain = np.linalg.svd(w, compute_uv=False)
    whitened = np.sqrt(np.clip(np.linalg.eigvalsh(w @ gram @ w.T)[::-1], 0.0, None))
    return [{"layer": layer, "expert": expert, "matrix": matrix, "plain": plain.tolist(),
             "whitened": whitened[: len(plain)].tolist()}]


def _history_dict(result) -> dict:
    history = getattr(result, "history", None)
    if history is None:
        return {"best": [], "mean": []}
    if isinstance(history, dict):
        return {k: np.asarray(v).tolist() for k, v in history.items()}
    return {"best": np.asarray(history.best).tolist(), "mean": np.asarray(history.mean).tolist()}


def _kt_block(runner, adapter, block, candidates, hidden_start, config) -> dict:
    """Stage 1c for one block: every combination of per-layer candidates through the real layers."""
    import torch

    from moei2 import prune_experts
    from moei2.blockwise import search_block

    first, last = block[0], block[-1]
    # Each position runs its MoE layer plus any dense layers up to the next MoE layer of the block.
    spans = [list(range(l, (block[i + 1] if i + 1 < len(block) else last + 1))) for i, l in enumerate(block)]
    num_cands = [len(candidates[l]["masks"]) for l in block]
    per_layer_best = [int(np.argmin(candidates[l]["losses"])) for l in block]
    if np.prod(num_cands) == 1:
        return {"layers": block, "choice": per_layer_best, "loss": None, "per_layer_best_loss": None,
                "combinations": [per_layer_best], "losses": [None]}

    pruned_layers: dict[tuple[int, int], object] = {}
    for pos, l in enumerate(block):
        for c, mask in enumerate(candidates[l]["masks"]):
            drop = [int(j) for j in np.flatnonzero(mask)]
            layer_copy = copy.deepcopy(adapter.decoder_layers[l])
            if drop:
                prune_experts(layer_copy, {l: drop}, layer_module=True)
            pruned_layers[(pos, c)] = layer_copy

    def forward(pos, cand, hidden):
        for li in spans[pos]:
            layer = pruned_layers[(pos, cand)] if li == block[pos] else None
            hidden = runner.run(li, hidden, layer=layer)
        return hidden

    def distance(a, b):
        return torch.linalg.vector_norm((a - b).double()).item()

    batch = config.calib_batch_size
    batches = []
    for s in range(0, hidden_start.shape[0], batch):
        h = hidden_start[s:s + batch]
        target = h
        for li in range(first, last + 1):
            target = runner.run(li, target)
        batches.append((h, target))
    combos, losses = search_block(num_cands, forward, batches, distance)
    best = int(np.argmin(losses))
    baseline_index = int(np.flatnonzero((combos == np.array(per_layer_best)).all(axis=1))[0])
    return {"layers": block, "choice": combos[best].tolist(), "loss": float(losses[best]),
            "per_layer_best": per_layer_best, "per_layer_best_loss": float(losses[baseline_index]),
            "combinations": combos.tolist(), "losses": losses.tolist()}


def _pack_factors(factors: dict) -> dict:
    out = {}
    for j, mats in factors.items():
        for name, (A, B) in mats.items():
            out[f"{j}.{name}.A"] = np.asarray(A)
            out[f"{j}.{name}.B"] = np.asarray(B)
    return out


def _unpack_factors(arrays: dict, num_experts: int) -> dict:
    return {j: {name: (arrays[f"{j}.{name}.A"], arrays[f"{j}.{name}.B"]) for name in ("gate", "up", "down")}
            for j in range(num_experts)}
