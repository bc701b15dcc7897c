"""The device path on a real CUDA device (skipped without one; benchmarks/device_check.sh runs
these first): the same choices as the CPU, streamed and in memory, graph-free Grams, factors equal
to the C kernel's, deterministic reruns, LoRA on the device."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2 import lowrank  # noqa: E402
from moei2.calibrate import ExpertGrams, iter_layer_stats  # noqa: E402
from moei2.device_kernels import decompose_torch  # noqa: E402
from moei2.models import get_adapter  # noqa: E402

from .test_device import lora_on_a_bfloat16_model  # noqa: E402
from .test_pipeline import CharTokenizer, calibration_texts, small_config  # noqa: E402
from .test_torch_kernels import _factors, _same_factorisation  # noqa: E402
from .tiny_models import EXPERTS, build_model, input_ids  # noqa: E402

pytestmark = pytest.mark.gpu


def test_decompose_on_the_device_equals_the_c_kernel():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 96)).astype(np.float32)
    X = rng.standard_normal((400, 96))
    X[:, 3] *= 50.0
    gram = X.T @ X
    A_ref, B_ref, info = lowrank.decompose(W, gram, 20, return_info=True)
    A, B, mine = decompose_torch(torch.from_numpy(W).cuda(), torch.from_numpy(gram).cuda(), 20)
    assert A.is_cuda and abs(mine["loss"] - info["loss"]) <= 1e-6 * info["loss"]
    _same_factorisation(A.cpu().numpy(), B.cpu().numpy(), A_ref, B_ref)


def test_grams_on_the_device_are_graph_free_and_equal_the_cpu_ones():
    model = build_model("qwen2_moe")
    ids = input_ids(4, 8)
    rows = [slice(0, 16), slice(16, 32)]
    cpu_stats = list(iter_layer_stats(model, ids, batch_size=2, progress=False))
    model.cuda()
    views = {v.layer_index: v for v in get_adapter(model).moe_layers()}
    for stats in cpu_stats:
        on_device = ExpertGrams(views[stats.layer_index], stats.X.cuda(), stats.top_k_index, rows)
        on_host = ExpertGrams(views[stats.layer_index], stats.X, stats.top_k_index, rows)
        for j in range(EXPERTS):
            for g, ref in zip(on_device(j), on_host(j)):
                assert g.is_cuda and g.grad_fn is None and not g.requires_grad
                torch.testing.assert_close(g.cpu(), ref.cpu(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_cuda_makes_the_cpu_choices(tmp_path, streamed):
    config = small_config(kt_block=2, dtype="float32")
    reports, factors = {}, {}
    for device in ("cpu", "cuda"):
        run = dataclasses.replace(config, device=device)
        work = tmp_path / f"work-{device}"
        if streamed:
            path = tmp_path / "hf"
            if not path.exists():
                build_model("qwen2_moe", layers=3).save_pretrained(str(path), max_shard_size="20KB")
            _, reports[device] = moei2.compress(path, CharTokenizer(), calibration_texts(), run,
                                                output=tmp_path / f"out-{device}", work_dir=work, progress=False)
        else:
            _, reports[device] = moei2.compress(build_model("qwen2_moe", layers=3), CharTokenizer(),
                                                calibration_texts(), run, work_dir=work, progress=False)
        factors[device] = _factors(work)
    for l, info in reports["cpu"]["layers"].items():
        assert reports["cuda"]["layers"][l]["dropped"] == info["dropped"]
        assert reports["cuda"]["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
        np.testing.assert_allclose(reports["cuda"]["layers"][l]["importance"], info["importance"], rtol=1e-4)
    for layer, arrays in factors["cpu"].items():
        for key in arrays:
            if key.endswith(".A"):
                B = key[:-1] + "B"
                _same_factorisation(factors["cuda"][layer][key], factors["cuda"][layer][B], arrays[key], arrays[B])


def test_cuda_reruns_are_identical(tmp_path):
    config = small_config(kt_block=2, device="cuda", dtype="bfloat16")
    a = moei2.compress(build_model("mixtral", layers=3), CharTokenizer(), calibration_texts(), config,
                       work_dir=tmp_path / "a", progress=False)[1]
    b = moei2.compress(build_model("mixtral", layers=3), CharTokenizer(), calibration_texts(), config,
                       work_dir=tmp_path / "b", progress=False)[1]
    for l in a["layers"]:
        assert a["layers"][l] == b["layers"][l]
    for layer, arrays in _factors(tmp_path / "a").items():
        other = _factors(tmp_path / "b")[layer]
        assert all(np.array_equal(arrays[k], other[k]) for k in arrays)


def test_lora_trains_on_the_device_and_returns_the_model_home():
    lora_on_a_bfloat16_model("cuda")
