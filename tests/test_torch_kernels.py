"""The torch device path (``kernels="torch"``) run on the CPU against the C core: same masks, same
ranks, factors equal to 1e-6 relative, in float32 and bfloat16, in memory and streamed."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2 import lowrank  # noqa: E402
from moei2.device_kernels import decompose_torch  # noqa: E402

from .test_pipeline import CharTokenizer, calibration_texts, small_config  # noqa: E402
from .tiny_models import build_model  # noqa: E402

RTOL = 1e-6


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _same_up_to_column_signs(A, B, A_ref, B_ref):
    """Eigenvector signs are the solver's: flip the columns of A (rows of B) to the reference's."""
    signs = np.sign(np.sum(np.asarray(A, np.float64) * np.asarray(A_ref, np.float64), axis=0))
    signs[signs == 0] = 1
    assert _rel(A * signs, A_ref) < RTOL, _rel(A * signs, A_ref)
    assert _rel(B * signs[:, None], B_ref) < RTOL, _rel(B * signs[:, None], B_ref)


def _same_factorisation(A, B, A_ref, B_ref):
    """The product A B and the projector A A^T to 1e-6 relative. Column by column is too strict
    for real layers: two close kept eigenvalues (a tiny model's experts have them) leave each
    eigenvector ill-conditioned, though their span, and so the factorisation, is not."""
    A64, Ar64 = np.asarray(A, np.float64), np.asarray(A_ref, np.float64)
    assert _rel(A64 @ B, Ar64 @ B_ref) < RTOL
    assert _rel(A64 @ A64.T, Ar64 @ Ar64.T) < RTOL


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (12, 12)])
@pytest.mark.parametrize("gram_kind", ["full", "singular", "none"])
def test_decompose_torch_equals_the_c_kernel(shape, gram_kind):
    rng = np.random.default_rng(sum(shape))
    m, n = shape
    W = rng.standard_normal(shape).astype(np.float32)
    gram = None
    if gram_kind != "none":
        X = rng.standard_normal((3 * n if gram_kind == "full" else n // 2, n))
        X[:, 0] *= 30.0  # an outlier channel, as in real layer inputs
        gram = X.T @ X
    r = min(m, n) // 2
    A_ref, B_ref, info = lowrank.decompose(W, gram, r, return_info=True)
    A, B, mine = decompose_torch(torch.from_numpy(W), None if gram is None else torch.from_numpy(gram), r)
    assert A.dtype == torch.float32 and B.dtype == torch.float32
    assert mine["route"] == info["route"]
    # A loss that is zero in exact arithmetic is rounding of the eigenvalues, ~sqrt(eps) of the energy.
    assert abs(mine["loss"] - info["loss"]) <= RTOL * info["loss"] + 1e-7 * info["energy"]
    _same_up_to_column_signs(A.numpy(), B.numpy(), A_ref, B_ref)


def test_decompose_torch_refuses_a_bad_rank():
    with pytest.raises(ValueError, match=r"rank must be in \[1, 3\]"):
        decompose_torch(torch.ones(3, 5), None, 4)


def _factors(work_dir):
    return {p.stem: dict(np.load(p)) for p in sorted(work_dir.glob("factors_layer*.npz"))}


def _checkpoint(tmp_path, family, dtype):
    path = tmp_path / f"{family}-{str(dtype)[6:]}-hf"
    build_model(family, layers=3, dtype=dtype).save_pretrained(str(path), max_shard_size="20KB")
    return path


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_kernels_on_cpu_make_the_c_core_choices(tmp_path, streamed, dtype):
    family = "qwen2_moe"
    config = small_config(kt_block=2, dtype=str(dtype)[6:])
    reports, factors = {}, {}
    for kernels in ("c", "torch"):
        work = tmp_path / f"work-{kernels}"
        run = dataclasses.replace(config, kernels=kernels)
        if streamed:
            _, reports[kernels] = moei2.compress(_checkpoint(tmp_path, family, dtype), CharTokenizer(),
                                                 calibration_texts(), run, output=tmp_path / f"out-{kernels}",
                                                 work_dir=work, progress=False)
        else:
            _, reports[kernels] = moei2.compress(build_model(family, layers=3, dtype=dtype), CharTokenizer(),
                                                 calibration_texts(), run, work_dir=work, progress=False)
        factors[kernels] = _factors(work)
    c, t = reports["c"], reports["torch"]
    assert t["config"]["kernels"] == "torch" and c["config"]["kernels"] == "c"
    for l, info in c["layers"].items():
        assert t["layers"][l]["dropped"] == info["dropped"]
        assert t["layers"][l]["search"]["candidates"] == info["search"]["candidates"]
        assert t["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
        # The torch path computes candidate outputs in the layer's dtype, as the model does; the C
        # core widens bfloat16 weights to float32 first: the losses agree to bfloat16's precision.
        np.testing.assert_allclose(t["layers"][l]["importance"], info["importance"],
                                   rtol=1e-5 if dtype == torch.float32 else 4e-3)
        np.testing.assert_allclose(t["layers"][l]["lowrank"]["losses"], info["lowrank"]["losses"], rtol=1e-5)
    assert [b["choice"] for b in t["blocks"]] == [b["choice"] for b in c["blocks"]]
    assert sorted(factors["torch"]) == sorted(factors["c"]) and factors["c"]
    for layer, arrays in factors["c"].items():
        mine = factors["torch"][layer]
        assert sorted(mine) == sorted(arrays)
        for key in arrays:
            if key.endswith(".A"):
                B = key[:-1] + "B"
                _same_factorisation(mine[key], mine[B], arrays[key], arrays[B])


def test_kernels_setting():
    assert moei2.CompressionConfig().kernels == "auto"
    assert not moei2.CompressionConfig().torch_kernels()
    assert moei2.CompressionConfig(device="cuda").torch_kernels()
    assert not moei2.CompressionConfig(device="cuda", kernels="c").torch_kernels()
    assert moei2.CompressionConfig(kernels="torch").torch_kernels()
    assert moei2.CompressionConfig().torch_kernels(torch.device("cuda", 1))
    assert not moei2.CompressionConfig(device="cuda").torch_kernels(torch.device("cpu"))
    with pytest.raises(ValueError, match="kernels must be one of"):
        moei2.CompressionConfig(kernels="cuda")


@pytest.mark.parametrize("duplicate", [False, True], ids=["distinct", "two-equal-experts"])
def test_search_cache_from_gram_factors_equals_from_moe(duplicate):
    """Only each token's C x C Gram factor crosses from the device: the cache built from it
    equals the C core's from the weights, also when two experts are equal (every token holding
    both has a singular Gram: the eigendecomposition route)."""
    from moei2.calibrate import iter_layer_stats
    from moei2.models import get_adapter
    from moei2.search import Layer
    from moei2.stages.selection import candidate_output_factors, router_logits_float64

    model = build_model("qwen3_moe", layers=1)
    view = get_adapter(model).moe_layers()[0]
    if duplicate:
        with torch.no_grad():
            view.experts_module.gate_up_proj[3] = view.experts_module.gate_up_proj[5]
            view.experts_module.down_proj[3] = view.experts_module.down_proj[5]
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=2, progress=False)))
    common = dict(top_k=int(view.top_k), renormalize=bool(view.renormalize), scaling_factor=float(view.scaling_factor),
                  r_max=4, batch_sizes=[32, 32])
    reference = Layer.from_moe(stats.X.numpy(), view.router_weight.detach().numpy(),
                               view.gate_up_proj.detach().numpy(), view.down_proj.detach().numpy(), act="silu",
                               **common)
    factors = candidate_output_factors(view, stats.X)
    cand = reference._cache.candidates(0, 64)
    L = factors(cand, 0)
    assert L.shape == (64, cand.shape[1], cand.shape[1]) and L.dtype == np.float64
    layer = Layer.from_candidate_outputs(router_logits_float64(view, stats.X), factors, **common)
    rng = np.random.default_rng(3)
    masks = np.zeros((30, view.num_experts), dtype=bool)
    for m in masks:
        m[rng.choice(view.num_experts, size=rng.integers(1, 5), replace=False)] = True
    np.testing.assert_allclose(layer.loss(masks), reference.loss(masks), rtol=1e-6)
    np.testing.assert_allclose(layer.expert_importance(), reference.expert_importance(), rtol=1e-6)
