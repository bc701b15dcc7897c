"""moei2.compress end to end on tiny models of every family, checked against direct computation."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moei2  # noqa: E402
import moei2.pipeline  # noqa: E402
from moei2 import search  # noqa: E402
from moei2.models import get_adapter  # noqa: E402
from moei2.stages.selection import search_layer  # noqa: E402

from .tiny_models import EXPERTS, FAMILIES, TOP_K, build_model  # noqa: E402


class CharTokenizer:
    """Enough of a tokenizer for calibration_windows: one id per character."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [3 + (ord(c) % 97) for c in text]}


def calibration_texts(seed=0):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 7))) for _ in range(60)]
    return [" ".join(rng.choice(words, size=150)) for _ in range(16)]


LAYERS = 4


def small_config(**overrides):
    base = dict(num_sequences=8, seq_len=24, calib_batch_size=4, population=24, generations=8,
                kt_candidates=2, kt_block=2, seed=7)
    base.update(overrides)
    return moei2.CompressionConfig(**base)


def last_hidden_states(model, ids, batch_size):
    """The last decoder layer's output for each calibration batch of ``ids``."""
    captured = []
    handle = get_adapter(model).decoder_layers[-1].register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s:s + batch_size], use_cache=False)
    handle.remove()
    return captured


def count_calls(monkeypatch, owner, name, *, interrupt_at=None):
    """Replaces ``owner.name`` by a wrapper counting its calls in the returned dict's ``"n"``; call
    number ``interrupt_at`` raises KeyboardInterrupt instead (a user stopping the run)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def moe_output(decoder_layer, adapter, x):
    """The MoE block's full output (routed + shared) for inputs x [N, H]."""
    block = adapter.moe_block(decoder_layer)
    with torch.no_grad():
        out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_report_and_model(family):
    model = build_model(family, layers=LAYERS)
    adapter = get_adapter(model)
    moe_layers = [v.layer_index for v in adapter.moe_layers()]
    config = small_config()
    model, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)

    budget = round(config.prune_ratio * EXPERTS * len(moe_layers))
    counts = [report["layers"][str(l)]["prune_count"] for l in moe_layers]
    assert sum(counts) == budget and max(counts) <= EXPERTS - TOP_K
    views = {v.layer_index: v for v in get_adapter(model).moe_layers()}
    for l in moe_layers:
        info = report["layers"][str(l)]
        assert len(info["dropped"]) == info["prune_count"]
        assert sorted(info["dropped"] + info["kept"]) == list(range(EXPERTS))
        chosen = info["search"]["candidates"][info["search"]["chosen_candidate"]]
        assert np.flatnonzero(chosen).tolist() == info["dropped"]
        assert views[l].num_experts == len(info["kept"])
        ranks = info["lowrank"]["ranks"]
        assert [tuple(r) for r in views[l].ranks] == [(r, r, r) for r in ranks]
        # The rank budget is the one that keeps rank_keep_ratio of the dense expert parameters.
        inter, hidden = views[l].intermediate_size, views[l].hidden_size
        cap = inter * hidden // (inter + hidden)
        target = config.rank_keep_ratio * inter * hidden / (inter + hidden) * len(ranks)
        assert sum(ranks) == round(target) and 1 <= min(ranks) and max(ranks) <= cap
    for block in report["blocks"]:
        if block["loss"] is not None:
            assert block["loss"] <= block["per_layer_best_loss"] + 1e-12
            assert block["loss"] == pytest.approx(min(block["losses"]))
    p = report["parameters"]
    routed_after = sum(sum(t.numel() for t in v.experts_module.parameters()) for v in views.values())
    assert p["routed_expert_after"] == routed_after
    assert p["model_after"] == sum(t.numel() for t in model.parameters())
    assert 0.3 < p["routed_expert_reduction"] < 0.7
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, 100, (2, 10))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_search_loss_equals_pruned_hf_block(family):
    """One routing convention: the search's loss of a mask is what the pruned HF block produces."""
    from moei2.calibrate import iter_layer_stats
    from moei2.calibration_data import calibration_windows

    model = build_model(family, layers=2)
    adapter = get_adapter(model)
    ids = calibration_windows(CharTokenizer(), calibration_texts(), 6, 16, seed=0)
    batch = 3
    stats = next(iter(iter_layer_stats(model, ids, batch_size=batch, progress=False)))
    view = adapter.view(stats.layer_index)
    # The pipeline's own construction: the C core from the weights, or the family's expert forward
    # in torch where the experts are not the shared layout (gpt-oss).
    ctx = SimpleNamespace(torch_kernels=False, batch_sizes=[batch * 16, batch * 16])
    layer = search_layer(ctx, stats, view, 3)
    rng = np.random.default_rng(1)
    for r in (1, 2, 3):
        drop = sorted(rng.choice(EXPERTS, size=r, replace=False).tolist())
        mask = np.zeros(EXPERTS, dtype=bool)
        mask[drop] = True
        pruned_model = moei2.prune_experts(copy.deepcopy(model), {stats.layer_index: drop})
        pruned = get_adapter(pruned_model).decoder_layers[stats.layer_index]
        direct = 0.0
        for b in range(2):
            x = stats.X[b * batch * 16:(b + 1) * batch * 16]
            # Shared experts are untouched, so the full-block difference is the routed difference.
            diff = moe_output(adapter.decoder_layers[stats.layer_index], adapter, x) - moe_output(pruned, adapter, x)
            direct += torch.linalg.vector_norm(diff.double()).item()
        assert layer.loss(mask)[0] == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_kt_block_losses_are_real_decoder_layers():
    """Every KT combination's loss equals the hidden-state error of the model pruned that way."""
    family = "qwen2_moe"
    model = build_model(family, layers=3)
    original = copy.deepcopy(model)
    config = small_config(kt_block=3, kt_candidates=2, rank_keep_ratio=None)
    _, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    block = report["blocks"][0]
    assert block["layers"] == [0, 1, 2] and len(block["losses"]) == 8

    from moei2.calibration_data import calibration_windows

    ids = calibration_windows(CharTokenizer(), calibration_texts(), config.num_sequences, config.seq_len, config.seed)

    def last_hidden(m):
        return last_hidden_states(m, ids, config.calib_batch_size)

    target = last_hidden(original)
    for combo, loss in list(zip(block["combinations"], block["losses"]))[::3]:
        candidate = copy.deepcopy(original)
        dropped = {l: np.flatnonzero(report["layers"][str(l)]["search"]["candidates"][c]).tolist()
                   for l, c in zip(block["layers"], combo)}
        moei2.prune_experts(candidate, {l: d for l, d in dropped.items() if d})
        direct = sum(torch.linalg.vector_norm((a - b).double()).item()
                     for a, b in zip(last_hidden(candidate), target))
        assert loss == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("search_hidden", ["original", "compressed"])
def test_genetic_candidates_match_exhaustive_on_tiny_layers(search_hidden):
    """The search of each layer sees the hidden state the method choice names: the unmodified
    model's ("original"), or the one propagated through the layers already compressed."""
    from moei2.calibrate import iter_layer_stats
    from moei2.calibration_data import calibration_windows
    from moei2.source import InMemorySource

    model = build_model("mixtral", layers=2)
    config = small_config(kt_block=1, kt_candidates=3, population=40, generations=20, rank_keep_ratio=None,
                          search_hidden=search_hidden)
    report = moei2.pipeline.compress_source(InMemorySource(model), CharTokenizer(), calibration_texts(), config,
                                            progress=False)
    assert report["search_hidden"] == search_hidden
    ids = calibration_windows(CharTokenizer(), calibration_texts(), config.num_sequences, config.seq_len, config.seed)
    original = build_model("mixtral", layers=2)
    adapter = get_adapter(original)
    # A layer's MoE input does not depend on its own experts: the fully pruned model gives every
    # layer's input after the compressed layers before it.
    inputs_from = original if search_hidden == "original" else model
    for stats in iter_layer_stats(inputs_from, ids, batch_size=config.calib_batch_size, progress=False):
        info = report["layers"][str(stats.layer_index)]
        view = adapter.view(stats.layer_index)
        layer = search.Layer.from_moe(
            stats.X.numpy(), view.router_weight.detach().numpy(), view.gate_up_proj.detach().numpy(),
            view.down_proj.detach().numpy(), top_k=view.top_k, renormalize=view.renormalize,
            scaling_factor=view.scaling_factor, r_max=info["prune_count"],
            batch_sizes=[config.calib_batch_size * config.seq_len] * 2)
        best = layer.exhaustive(info["prune_count"], k_best=3)
        np.testing.assert_array_equal(np.asarray(info["search"]["candidates"]), best.masks)
        np.testing.assert_allclose(info["search"]["candidate_losses"], best.losses, rtol=1e-9)


def test_resume_after_interruption_gives_the_same_result(tmp_path, monkeypatch):
    texts = calibration_texts()
    config = small_config()
    reference_model, reference = moei2.compress(build_model("deepseek_v2", layers=LAYERS), CharTokenizer(), texts,
                                                config, progress=False)

    calls = {"n": 0}
    real_genetic = search.Layer.genetic

    def failing_genetic(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_genetic(self, *args, **kwargs)

    monkeypatch.setattr(search.Layer, "genetic", failing_genetic)
    with pytest.raises(KeyboardInterrupt):
        moei2.compress(build_model("deepseek_v2", layers=LAYERS), CharTokenizer(), texts, config,
                       work_dir=tmp_path, progress=False)
    monkeypatch.setattr(search.Layer, "genetic", real_genetic)
    model, report = moei2.compress(build_model("deepseek_v2", layers=LAYERS), CharTokenizer(), texts, config,
                                   work_dir=tmp_path, progress=False)
    assert report["resumed"] is True
    for l, info in reference["layers"].items():
        assert report["layers"][l]["dropped"] == info["dropped"]
        assert report["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference_model(input_ids=ids).logits,
                                   rtol=0, atol=0)

    # A different model must not reuse this work directory.
    with pytest.raises(ValueError, match="work_dir"):
        moei2.compress(build_model("deepseek_v2", layers=LAYERS, seed=5), CharTokenizer(), texts, config,
                       work_dir=tmp_path, progress=False)


@pytest.mark.parametrize("overrides", [
    dict(selection="greedy"), dict(selection="frequency"), dict(selection="reap"), dict(selection="random"),
    dict(rank_rule="uniform", whiten=False), dict(prune_ratio=0.0), dict(rank_keep_ratio=None, kt_block=1),
])
def test_baseline_options_run_at_the_same_budget(overrides):
    model = build_model("olmoe", layers=2)
    config = small_config(**overrides)
    model, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    removed = sum(len(info["dropped"]) for info in report["layers"].values())
    assert removed == round(config.prune_ratio * EXPERTS * 2)
    decomposed = all("lowrank" in info for info in report["layers"].values())
    assert decomposed == (config.rank_keep_ratio is not None)


def test_whitening_lowers_the_layer_output_error():
    """At equal ranks, whitened factors reconstruct the MoE output better than plain SVD."""
    from moei2.calibration_data import calibration_windows

    errors = {}
    # Held-out text from the same source: whitening fits the input distribution it was given.
    ids = calibration_windows(CharTokenizer(), calibration_texts(seed=1), 4, 24, seed=3)
    original = build_model("qwen3_moe", layers=2)
    with torch.no_grad():
        target = original(input_ids=ids).logits
    for whiten in (True, False):
        config = small_config(prune_ratio=0.0, rank_keep_ratio=0.4, rank_rule="uniform", whiten=whiten)
        model, _ = moei2.compress(build_model("qwen3_moe", layers=2), CharTokenizer(), calibration_texts(), config,
                                  progress=False)
        with torch.no_grad():
            errors[whiten] = torch.linalg.vector_norm(model(input_ids=ids).logits - target).item()
    assert errors[True] < errors[False]


def test_lora_recovery_option():
    pytest.importorskip("peft")
    model = build_model("qwen2_moe", layers=2)
    config = small_config(lora=moei2.LoRAConfig(steps=6, batch_size=2, seq_len=24, rank=4,
                                                target_modules=("q_proj", "v_proj")))
    model, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    assert report["lora"]["steps"] == 6 and report["lora"]["merged"]
    assert math.isfinite(report["lora"]["loss_last"])
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_bad_inputs():
    model = build_model("mixtral", layers=2)
    with pytest.raises(TypeError, match="config"):
        moei2.compress(model, CharTokenizer(), calibration_texts(), config={"prune_ratio": 0.5})
    with pytest.raises(ValueError, match="texts"):
        moei2.compress(model, CharTokenizer(), ["", "  "], small_config(), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        moei2.compress(model, CharTokenizer(), ["short"], small_config(), progress=False)
    with pytest.raises(ValueError, match="prune_ratio"):
        small_config(prune_ratio=1.5)
    with pytest.raises(ValueError):
        moei2.compress(torch.nn.Linear(2, 2), CharTokenizer(), calibration_texts(), small_config(), progress=False)
