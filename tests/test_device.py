"""Device handling that needs no accelerator: one normalised device identity, devices refused
before a model loads, no autograd graph through any statistics pass, float32 master weights."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moei2 import cli  # noqa: E402
from moei2.calibrate import ExpertGrams, LayerRunner, iter_layer_stats  # noqa: E402
from moei2.models import get_adapter  # noqa: E402
from moei2.source import as_device, check_device  # noqa: E402

from .test_cli import never_load  # noqa: E402,F401  (a fixture)
from .tiny_models import EXPERTS, build_model, input_ids  # noqa: E402


def test_a_device_without_index_is_the_one_its_tensors_report():
    # torch.device("cuda") != torch.device("cuda:0"): a value stored under one is missed under the other.
    assert torch.device("cuda") != torch.device("cuda:0")
    expected = torch.cuda.current_device() if torch.cuda.is_available() else 0
    for spelling in ("cuda", torch.device("cuda"), f"cuda:{expected}", torch.device("cuda", expected)):
        assert as_device(spelling) == torch.device("cuda", expected)
    assert as_device("cpu") == torch.device("cpu") and as_device("meta") == torch.device("meta")
    runner = LayerRunner(build_model("qwen2_moe"), device=torch.device("cuda"))
    assert runner.device == torch.device("cuda", expected)
    with pytest.raises(ValueError, match="device: 'gpu' is not a torch device"):
        as_device("gpu")


def test_runner_finds_the_layer_arguments_under_either_spelling():
    model = build_model("mixtral")
    ids = input_ids(2, 5)
    runner = LayerRunner(model, device=torch.device("cpu"))
    hidden = runner.embed(ids)
    keys = list(runner._kwargs)
    runner._layer_kwargs(2, 5, "cpu")
    runner._layer_kwargs(2, 5, hidden.device)
    assert list(runner._kwargs) == keys  # no second capture


def _no_cuda(monkeypatch, count=0, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")


def test_devices_this_machine_lacks_are_refused(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(ValueError, match="device: 'cuda' was asked for, but .* no cuda device available"):
        check_device("cuda")
    _no_cuda(monkeypatch, count=1)
    assert check_device("cuda", "float32") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device: cuda:3 does not exist: this machine has 1 cuda device\(s\)"):
        check_device("cuda:3")
    _no_cuda(monkeypatch, count=1, bf16=False)
    with pytest.raises(ValueError, match="dtype: Old GPU .* cannot compute in bfloat16"):
        check_device("cuda", "bfloat16")
    assert check_device("cpu", "bfloat16") == torch.device("cpu")


@pytest.mark.parametrize("command", [["compress", "-o", "OUT"], ["evaluate", "demo"]])
@pytest.mark.parametrize("device, count, message", [("cuda", 0, "no cuda device available"),
                                                     ("cuda:2", 1, "cuda:2 does not exist")])
def test_cli_refuses_a_missing_device_in_one_line(command, device, count, message, monkeypatch, tmp_path, capsys,
                                                 never_load):
    _no_cuda(monkeypatch, count=count)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command] + ["--device", device]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith(f"moei2 {command[0]}: error: device")
    assert not (tmp_path / "out").exists()


def _graph_free(t):
    return t.grad_fn is None and not t.requires_grad


def test_no_autograd_graph_survives_a_statistics_pass():
    """The expert weights require grad (a model fresh from from_pretrained): every Gram and
    statistic must still come out without a graph, called outside any no_grad scope."""
    model = build_model("qwen2_moe")
    assert all(p.requires_grad for p in model.parameters())
    views = {v.layer_index: v for v in get_adapter(model).moe_layers()}
    ids = input_ids(3, 6)
    rows = [slice(0, 12), slice(12, 18)]
    for stats in iter_layer_stats(model, ids, grams="all", batch_size=2, progress=False):
        for t in (stats.X, stats.router_logits, stats.Y, stats.gram_in, stats.gram_down, stats.hidden_in):
            assert _graph_free(t)
        grams = ExpertGrams(views[stats.layer_index], stats.X, stats.top_k_index, rows)
        for j in range(EXPERTS):
            assert all(_graph_free(g) for g in grams(j))
        from moei2.stages.selection import candidate_outputs, router_logits_float64

        cand = torch.zeros((4, 2), dtype=torch.long).numpy()
        assert candidate_outputs(views[stats.layer_index], stats.X)(cand, 0).shape == (4, 2, stats.X.shape[1])
        logits = router_logits_float64(views[stats.layer_index], stats.X)
        torch.testing.assert_close(torch.from_numpy(logits), stats.X.double() @ views[stats.layer_index]
                                   .router_weight.detach().double().T)


def test_master_weights_keep_steps_below_bfloat16_spacing():
    """AdamW's steps of 1e-4 are below bfloat16's spacing at 1.0 (2**-7): applied to the weight
    itself they round away; the float32 master accumulates them."""
    from moei2.lora import MasterWeights

    narrow = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    wide = torch.nn.Parameter(torch.ones(4, dtype=torch.float32))
    masters = MasterWeights([narrow, wide])
    assert masters.parameters[1] is wide and masters.parameters[0].dtype == torch.float32
    optimizer = torch.optim.AdamW(masters.parameters, lr=1e-4, weight_decay=0.0)
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain_optimizer = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(200):
        for p in (narrow, wide, plain):
            p.grad = torch.ones_like(p)
        masters.gather_grads()
        assert narrow.grad is None
        optimizer.step()
        plain_optimizer.step()
        masters.scatter()
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))  # every step rounded away
    torch.testing.assert_close(masters.parameters[0].detach(), torch.full((4,), 0.98), rtol=0, atol=1e-4)
    torch.testing.assert_close(narrow.detach(), torch.full((4,), 0.98, dtype=torch.bfloat16))
    torch.testing.assert_close(wide.detach(), torch.full((4,), 0.98), rtol=0, atol=1e-4)


def lora_on_a_bfloat16_model(device: str) -> None:
    """LoRA on ``device`` of a compressed bfloat16 model kept on the CPU: it trains (through float32
    masters, or every step of the factors would round away), and the model comes back home in bfloat16."""
    pytest.importorskip("peft")
    import moei2
    from moei2.config import LoRAConfig
    from moei2.lora import lora_finetune

    from .test_pipeline import CharTokenizer, calibration_texts, small_config

    model, _ = moei2.compress(build_model("qwen2_moe", layers=2, dtype=torch.bfloat16), CharTokenizer(),
                              calibration_texts(), small_config(dtype="bfloat16"), progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = lora_finetune(model, CharTokenizer(), calibration_texts(),
                           LoRAConfig(steps=3, batch_size=2, seq_len=16, target_modules=("q_proj",)), device=device)
    assert report["steps"] == 3 and torch.isfinite(torch.tensor(report["loss_last"]))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("lowrank" in n for n in changed) and any("q_proj" in n for n in changed)


def test_lora_on_a_bfloat16_model_trains_float32_masters_and_keeps_the_dtype():
    lora_on_a_bfloat16_model("cpu")


def test_device_out_of_memory_names_the_layer_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """The device running out of memory in layer 1's decomposition: one line naming the layer and
    what was asked for; the work_dir then resumes to the uninterrupted result."""
    import moei2
    from moei2 import lowrank
    from moei2.pipeline import DeviceOutOfMemory

    from .test_pipeline import CharTokenizer, calibration_texts, small_config

    config = small_config()
    whole, _ = moei2.compress(build_model("qwen2_moe"), CharTokenizer(), calibration_texts(), config, progress=False)
    real = lowrank.decompose_many
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total "
                                         "capacity of 79.10 GiB of which 1.20 GiB is free.")
        return real(*args, **kwargs)

    monkeypatch.setattr(lowrank, "decompose_many", failing)
    model = build_model("qwen2_moe")
    with pytest.raises(DeviceOutOfMemory, match=r"device cpu: out of memory at layer 1 \(prune, decomposition\) "
                                                r"\(it needed 2.50 GiB more\); every finished layer is in the work_dir"):
        moei2.compress(model, CharTokenizer(), calibration_texts(), config, work_dir=tmp_path / "work", progress=False)
    monkeypatch.setattr(lowrank, "decompose_many", real)
    resumed, report = moei2.compress(build_model("qwen2_moe"), CharTokenizer(), calibration_texts(), config,
                                     work_dir=tmp_path / "work", progress=False)
    assert report["resumed"]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
