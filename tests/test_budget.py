"""REAP saliency, the budget allocator (against brute force) and budget mode end to end."""
import numpy as np
import pytest
import torch

from moei2.models import get_adapter

from .tiny_models import build_model


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_reap_saliency_matches_numpy(family):
    """REAP's S_j = mean over routed tokens of softmax_j(logits) * ||expert_j(x)||_2, computed
    directly in float64 NumPy from the weights, every expert on every token."""
    from moei2.calibrate import iter_layer_stats
    from moei2.stages.selection import reap_saliency

    model = build_model(family, layers=2)
    adapter = get_adapter(model)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=2, progress=False)))
    view = adapter.view(stats.layer_index)
    got = reap_saliency(stats, view)

    X = stats.X.double().numpy()
    logits = X @ view.router_weight.double().numpy().T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :view.top_k]
    gate_up = view.gate_up_proj.double().numpy()
    down = view.down_proj.double().numpy()
    inter = view.intermediate_size
    expected = np.zeros(view.num_experts)
    for j in range(view.num_experts):
        routed = (top == j).any(axis=1)
        if not routed.any():
            continue
        h = X[routed] @ gate_up[j].T
        out = (_silu(h[:, :inter]) * h[:, inter:]) @ down[j].T
        expected[j] = np.mean(p[routed, j] * np.linalg.norm(out, axis=1))
    assert (expected > 0).sum() >= view.num_experts - 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)


# ---- the allocator -----------------------------------------------------------------------------

import itertools  # noqa: E402
import threading  # noqa: E402

from moei2.budget import LayerCosts, allocate  # noqa: E402


def random_layer(rng, experts=3, max_rank=3, max_drop=2, dense=7, step=3, prune_scale=1.0, trunc_scale=1.0, biases=0):
    steps = np.sort(rng.exponential(1.0, size=(experts, max_rank)), axis=1)[:, ::-1]  # convex tails
    truncation = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1] * trunc_scale
    truncation = truncation - steps[:, -1:] * trunc_scale  # the last rank costs 0 only sometimes
    truncation = np.maximum(truncation, 0.0)
    prune = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0, size=max_drop))]) * prune_scale
    return LayerCosts(prune_loss=prune, drop_order=rng.permutation(experts)[:max_drop], truncation=truncation,
                      dense_params=dense, rank_params=step, bias_params=biases)


def brute_force(layers, target):
    """Every drop count, mode and rank vector of every layer: the exact optimum."""
    per_layer = []
    for c in layers:
        options = []
        for d in range(c.max_drop + 1):
            survivors = c.survivors(d)
            options.append((len(survivors) * (c.dense_params + c.bias_params), c.prune_loss[d]))
            for ranks in itertools.product(range(1, c.max_rank + 1), repeat=len(survivors)):
                options.append((sum(ranks) * c.rank_params + len(survivors) * c.bias_params,
                                c.prune_loss[d] + sum(c.truncation[j, r - 1] for j, r in zip(survivors, ranks))))
        per_layer.append(options)
    best = np.inf
    for combo in itertools.product(*per_layer):
        if sum(p for p, _ in combo) <= target:
            best = min(best, sum(c for _, c in combo))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocator_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(3):
        experts = int(rng.integers(2, 4))
        layers.append(random_layer(rng, experts=experts, max_rank=int(rng.integers(2, 4)),
                                   max_drop=int(rng.integers(1, experts)), dense=int(rng.integers(5, 9)),
                                   step=int(rng.integers(2, 4)), biases=int(rng.integers(0, 3)) * (seed % 2)))
    full = sum(c.num_experts * (c.dense_params + c.bias_params) for c in layers)
    least = sum(c.min_params() for c in layers)
    target = int(rng.integers(least, full + 1))
    plans = allocate(layers, target)
    assert sum(p.params for p in plans) <= target
    expected = brute_force(layers, target)
    assert sum(p.cost for p in plans) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    for c, p in zip(layers, plans):  # the plan's figures are those of its choice
        survivors = c.survivors(len(p.dropped))
        assert p.dropped == [int(j) for j in c.drop_order[:len(p.dropped)]]
        if p.ranks is None:
            assert p.params == len(survivors) * (c.dense_params + c.bias_params)
        else:
            assert sorted(p.ranks) == survivors.tolist()
            assert p.params == sum(p.ranks.values()) * c.rank_params + len(survivors) * c.bias_params
            cost = c.prune_loss[len(p.dropped)] + sum(c.truncation[j, r - 1] for j, r in p.ranks.items())
            assert p.cost == pytest.approx(cost)


def test_budget_is_met_within_one_rank_step_on_a_coarse_grid():
    rng = np.random.default_rng(5)
    # the shapes of the bundled model: H 128, I 96, rank cap floor(H I / (H + I)) = 54
    layers = [random_layer(rng, experts=16, max_rank=54, max_drop=8, dense=3 * 128 * 96, step=3 * (128 + 96))
              for _ in range(6)]
    full = sum(c.num_experts * c.dense_params for c in layers)
    for fraction in (0.3, 0.5, 0.7):
        target = int((1 - fraction) * full)
        plans = allocate(layers, target, max_grid=200)
        used = sum(p.params for p in plans)
        assert any(p.ranks is not None for p in plans)
        assert target - 3 * (128 + 96) < used <= target
        # the coarse grid is not worse than a finer one by more than what its rounding allows
        finer = allocate(layers, target, max_grid=2000)
        assert sum(p.cost for p in plans) <= 1.05 * sum(p.cost for p in finer) + 1e-9


def test_coarse_grid_refinement_ends_on_costs_spanning_many_orders_of_magnitude():
    """Real-width spectra: rank-1 costs near 1e8, tails near 1e-8, hundreds of ranks. The options
    table sums costs cumulatively and a plan sums them per expert; they differ in the last bits, and
    the refinement must not take an option that is cheaper only by that rounding, again and again."""
    rng = np.random.default_rng(11)
    layers = []
    for _ in range(4):
        experts, max_rank = 24, 300
        decay = np.exp(-np.linspace(0, 37, max_rank))[None, :] * rng.uniform(0.5, 2.0, size=(experts, 1))
        steps = 1e8 * decay                                  # non-increasing steps: convex costs
        truncation = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1] - steps[:, -1:]
        prune = np.concatenate([[0.0], np.cumsum(rng.uniform(1e6, 1e9, size=12))])
        layers.append(LayerCosts(prune_loss=prune, drop_order=rng.permutation(experts)[:12],
                                 truncation=np.maximum(truncation, 0.0), dense_params=3 * 2048 * 1408,
                                 rank_params=3 * (2048 + 1408)))
    full = sum(c.num_experts * c.dense_params for c in layers)
    for fraction in (0.5, 0.7):
        target = int((1 - fraction) * full)
        result = {}
        worker = threading.Thread(target=lambda: result.update(plans=allocate(layers, target, max_grid=300)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive(), "the allocator did not finish"
        used = sum(p.params for p in result["plans"])
        assert target - 3 * (2048 + 1408) < used <= target


def test_free_pruning_gives_pure_pruning_and_free_low_rank_pure_low_rank():
    rng = np.random.default_rng(1)
    free_prune = [random_layer(rng, experts=8, max_rank=10, max_drop=6, dense=30, step=4, prune_scale=0.0)
                  for _ in range(3)]
    full = sum(c.num_experts * c.dense_params for c in free_prune)
    plans = allocate(free_prune, int(0.5 * full))
    assert all(p.ranks is None for p in plans) and sum(p.cost for p in plans) == 0.0
    assert sum(len(p.dropped) for p in plans) == 12   # half of the 24 experts: exactly the budget
    free_rank = [random_layer(rng, experts=8, max_rank=10, max_drop=6, dense=30, step=4, trunc_scale=0.0)
                 for _ in range(3)]
    plans = allocate(free_rank, int(0.5 * full))
    assert all(p.ranks is not None and not p.dropped for p in plans) and sum(p.cost for p in plans) == 0.0
    assert int(0.5 * full) - 4 < sum(p.params for p in plans) <= int(0.5 * full)


def test_convex_minorant():
    from moei2.stages.budget import convex_minorant

    costs = np.array([10.0, 9.0, 4.0, 3.5, 1.0, 0.9, 0.0])
    hull = convex_minorant(costs)
    assert (hull <= costs + 1e-12).all() and (np.diff(hull, 2) >= -1e-12).all()
    np.testing.assert_allclose(hull[[0, 2, 4, 6]], costs[[0, 2, 4, 6]])
    np.testing.assert_allclose(hull[1], 7.0)
    smooth = np.array([5.0, 3.0, 2.0, 1.5, 1.25])
    np.testing.assert_array_equal(convex_minorant(smooth), smooth)


def _discarded_costs_brute_force(weight, x, through):
    """Every eigenpair of the full m x m W G W^T, G = X^T X: l_i ||T u_i||^2, decreasing l_i."""
    values, vectors = np.linalg.eigh(weight @ (x.T @ x) @ weight.T)
    values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
    return values * np.square(through @ vectors).sum(axis=0)


@pytest.mark.parametrize("m, n, tokens", [(12, 20, 5),    # rows route, N x N eigenproblem
                                          (12, 20, 15),   # rows route, m x m
                                          (12, 20, 40),   # Gram route
                                          (20, 12, 5),    # tall: rows route
                                          (20, 12, 40)])  # tall: QR of W, then the Gram
def test_discarded_costs_match_the_full_eigenproblem_on_every_route(m, n, tokens):
    from moei2.stages.budget import discarded_costs

    rng = np.random.default_rng(m * 100 + tokens)
    w = rng.standard_normal((m, n))
    x = rng.standard_normal((tokens, n)) * np.linspace(0.1, 3.0, n)
    through = rng.standard_normal((7, m))
    k = min(m, n)
    expected = _discarded_costs_brute_force(w, x, through)[:k]
    scale = expected.max()
    for given in ({"rows": x}, {"gram": x.T @ x}):
        np.testing.assert_allclose(discarded_costs(w, through=through, **given), expected, rtol=0, atol=1e-10 * scale)
        values = discarded_costs(w, **given)
        np.testing.assert_allclose(values, np.clip(np.linalg.eigvalsh(w @ x.T @ x @ w.T)[::-1][:k], 0, None),
                                   rtol=0, atol=1e-10 * values.max())
    if tokens < k:  # a rank-N Gram: every direction past the N-th costs nothing
        assert (discarded_costs(w, rows=x, through=through)[tokens:] == 0).all()


def test_truncation_parts_of_down_are_the_decomposition_losses():
    """The down projection's cost at rank r is the squared loss of its whitened rank-r factors."""
    from moei2.calibrate import ExpertGrams, iter_layer_stats
    from moei2.lowrank import decompose
    from moei2.stages.budget import expert_truncation_parts

    model = build_model("qwen2_moe").eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=4, progress=False, propagate=False)))
    view = get_adapter(model).view(stats.layer_index)
    grams = ExpertGrams(view, stats.X, stats.top_k_index, [slice(0, stats.X.shape[0])])
    checked = 0
    for j in range(view.num_experts):
        rows = stats.X[(stats.top_k_index == j).any(dim=1)]
        parts = expert_truncation_parts(view, j, rows, 4)
        _, gram_down = grams(j)
        down = view.expert(j)[2].double().numpy()
        for r in range(1, 5):
            loss = decompose(down, gram_down.numpy(), r, return_info=True)[2]["loss"]
            np.testing.assert_allclose(parts["down"][r - 1], loss ** 2, rtol=1e-8, atol=1e-12)
        checked += rows.shape[0] > 0
    assert checked >= 2


def test_truncation_parts_do_not_depend_on_the_row_chunk(monkeypatch):
    """Many rows are taken a chunk at a time (Grams, channel scales): the costs stay the same."""
    from moei2.calibrate import iter_layer_stats
    from moei2.stages import budget

    model = build_model("qwen2_moe").eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=8, progress=False, propagate=False)))
    view = get_adapter(model).view(stats.layer_index)
    rows = stats.X[(stats.top_k_index == 0).any(dim=1)]
    assert rows.shape[0] > view.hidden_size  # the Gram route, where chunks matter
    whole = budget.expert_truncation_parts(view, 0, rows, 6)
    monkeypatch.setattr(budget, "ROW_CHUNK", 7)
    chunked = budget.expert_truncation_parts(view, 0, rows, 6)
    for name in ("gate", "up", "down"):  # float32 products of a row vary with the batch's size, about 1e-7
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-9 * whole[name].max())


def test_channel_scales_are_the_gated_activations_derivatives_for_gpt_oss():
    """gpt-oss's clamped SwiGLU with biases: the scales are the RMS of the derivatives of its own
    _apply_gate (by autograd) over the expert's routed rows."""
    from moei2.stages.budget import channel_scales

    model = build_model("gpt_oss").eval()
    view = get_adapter(model).view(0)
    experts = view.experts_module
    rows = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 3
    j = 1
    pre = (rows @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j]).detach().double().requires_grad_()
    experts._apply_gate(pre).sum().backward()  # elementwise per channel: the gradient is each derivative
    rms = pre.grad.square().mean(dim=0).sqrt().numpy()
    scale_gate, scale_up = channel_scales(view, j, rows)
    np.testing.assert_allclose(scale_gate, rms[0::2], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(scale_up, rms[1::2], rtol=1e-5, atol=1e-9)
    assert (rms[1::2] > 0).all()


def test_allocator_refuses_what_it_cannot_do():
    rng = np.random.default_rng(0)
    layers = [random_layer(rng) for _ in range(2)]
    least = sum(c.min_params() for c in layers)
    with pytest.raises(ValueError, match="fewer than"):
        allocate(layers, least - 1)
    with pytest.raises(ValueError, match="convex"):
        LayerCosts(prune_loss=[0.0], drop_order=[], truncation=[[3.0, 2.5, 0.0]], dense_params=4, rank_params=1)
    with pytest.raises(ValueError, match="drop_order"):
        LayerCosts(prune_loss=[0.0, 1.0, 2.0], drop_order=[1, 1], truncation=[[1.0], [1.0], [1.0]],
                   dense_params=4, rank_params=1)


# ---- budget mode end to end ------------------------------------------------------------------

import moei2  # noqa: E402

from .test_pipeline import CharTokenizer, calibration_texts, small_config  # noqa: E402


@pytest.mark.parametrize("family, budget", [("deepseek_v2", 0.5), ("qwen2_moe", 0.7), ("gpt_oss", 0.5),
                                            ("llama4_text", 0.5)])
def test_budget_run_removes_that_share_of_routed_expert_parameters(family, budget):
    model = build_model(family, layers=4)
    config = small_config(budget=budget)
    model, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    views = get_adapter(model).moe_layers()
    H, inter = views[0].hidden_size, views[0].intermediate_size
    p = report["parameters"]
    target = int((1 - budget) * p["routed_expert_before"])
    assert target - 3 * (H + inter) < p["routed_expert_after"] <= target
    assert report["budget"]["planned_params"] == p["routed_expert_after"]
    for view in views:
        info = report["layers"][str(view.layer_index)]
        planned = report["budget"]["layers"][str(view.layer_index)]
        assert len(info["dropped"]) == len(planned["dropped"]) == info["prune_count"]
        assert view.num_experts == len(info["kept"])
        if planned["mode"] == "dense":
            assert not view.is_lowrank and "lowrank" not in info
        else:  # the planned total rank, shared among the experts the search kept
            assert sum(info["lowrank"]["ranks"]) == sum(planned["ranks"].values())
            assert [r[0] for r in view.ranks] == info["lowrank"]["ranks"]


def test_device_out_of_memory_in_budget_costs_names_the_layer_and_the_run_resumes(tmp_path, monkeypatch):
    """Budget mode's pass 1 running out of device memory in layer 1: one line naming the layer and
    the stage; the work_dir keeps layer 0's costs and the rerun gives the uninterrupted result."""
    from moei2.pipeline import DeviceOutOfMemory
    from moei2.stages import budget

    config = small_config(budget=0.5)
    whole, _ = moei2.compress(build_model("qwen2_moe"), CharTokenizer(), calibration_texts(), config, progress=False)
    real = budget.truncation_costs
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.25 GiB.")
        return real(*args, **kwargs)

    monkeypatch.setattr(budget, "truncation_costs", failing)
    with pytest.raises(DeviceOutOfMemory, match=r"out of memory at layer 1 \(budget costs\) \(it needed 1.25 GiB more\)"):
        moei2.compress(build_model("qwen2_moe"), CharTokenizer(), calibration_texts(), config,
                       work_dir=tmp_path / "work", progress=False)
    monkeypatch.setattr(budget, "truncation_costs", real)
    resumed, report = moei2.compress(build_model("qwen2_moe"), CharTokenizer(), calibration_texts(), config,
                                     work_dir=tmp_path / "work", progress=False)
    assert report["resumed"]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_budget_bad_input():
    for value in (0.0, 1.0, -0.1, 1.5, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="budget"):
            moei2.CompressionConfig(budget=value)
    for field, value in (("prune_ratio", 0.1), ("prune_total", 3), ("rank_keep_ratio", 0.5),
                         ("rank_keep_ratio", None), ("avg_rank", 4.0)):
        extra = {"rank_keep_ratio": None} if field == "avg_rank" else {}
        with pytest.raises(ValueError, match=f"budget replaces .*{field}="):
            moei2.CompressionConfig(budget=0.5, **{field: value}, **extra)
    with pytest.raises(ValueError, match="budget_max_prune"):
        moei2.CompressionConfig(budget=0.5, budget_max_prune=1.5)
    # 8 experts, top-2, at most half dropped: 4 survivors at rank 1 keep 4 x 3 (32 + 16) of 8 x 3 x 32 x 16,
    # so at most 95.3125 % can go; refused before calibration (the texts are never read)
    model = build_model("deepseek_v2", layers=3)
    with pytest.raises(ValueError, match=r"budget: 0.96 .*budget_max_prune=0.5.*95.31%"):
        moei2.compress(model, CharTokenizer(), None, small_config(budget=0.96), progress=False)


def test_budget_on_the_command_line(tmp_path, capsys, monkeypatch):
    from moei2 import cli

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    for name in ("_load_model", "_load_tokenizer", "run_compression"):
        monkeypatch.setattr(cli, name, load)
    out = tmp_path / "out"
    assert cli.main(["compress", "-o", str(out), "--budget", "0.5", "--prune-ratio", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budget replaces" in err and "prune_ratio=0.1" in err
    assert cli.main(["compress", "-o", str(out), "--budget", "0.995", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "budget: 0.995" in err and "budget_max_prune" in err
    assert not out.exists()
