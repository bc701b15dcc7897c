"""Reliability: a load never mixes two checkpoints, inputs are checked before they are trusted,
and every refusal comes before the long work."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402

from .tiny_models import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.append(sys.argv[1] + "/tests")  # tiny_models only: moei2 is the installed one
    import moei2
    from tiny_models import build_model
    # A and B differ in every tensor and in config.json (rms_norm_eps).
    models = [build_model("mixtral", seed=s, rms_norm_eps=1e-6 * (s + 1)) for s in (0, 1)]
    target, deadline = sys.argv[2], time.monotonic() + float(sys.argv[3])
    n = 0
    while time.monotonic() < deadline:
        moei2.save(models[n % 2], target, overwrite=True, max_shard_bytes=4096)
        n += 1
        if n == 2:
            open(target + ".ready", "w").close()
    print(n)
""")


def _signature(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_never_mixes_two_checkpoints_under_a_replacing_writer(tmp_path):
    target = str(tmp_path / "ckpt")
    originals = [build_model("mixtral", seed=s, rms_norm_eps=1e-6 * (s + 1)) for s in (0, 1)]
    wanted = [_signature(m) for m in originals]
    # Started outside the checkout, so that the child imports the moei2 the tests import.
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, ROOT, target, "30"], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(target + ".ready"):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        loads, mixed, stop = 0, [], time.monotonic() + 20
        while loads < 60 and time.monotonic() < stop:
            model = moei2.load(target, verify=loads % 2 == 0)
            got = model.state_dict()
            which = [i for i, want in enumerate(wanted)
                     if all(torch.equal(got[k], want[k]) for k in want)
                     and model.config.rms_norm_eps == originals[i].config.rms_norm_eps]
            if len(which) != 1:
                mixed.append(loads)
            loads += 1
    finally:
        writer.terminate()
        writer.wait(timeout=30)
    assert loads >= 10
    assert mixed == [], f"{len(mixed)} of {loads} loads mixed the two checkpoints"


def test_model_and_tokenizer_come_from_one_snapshot(tmp_path, monkeypatch):
    """evaluate's load: the tokenizer is read beside the weights, so a save replacing the checkpoint
    between the two reads cannot pair one checkpoint's model with another's tokenizer."""
    import moei2.io as io

    _, tokenizer = moei2.demo_model()
    model, other = build_model("mixtral", seed=0), build_model("mixtral", seed=1)
    target = tmp_path / "ckpt"
    moei2.save(model, target, tokenizer=tokenizer)
    real = io._load_snapshot

    def replaced_meanwhile(snapshot, *args):
        loaded = real(snapshot, *args)
        moei2.save(other, target, overwrite=True)  # the new checkpoint has no tokenizer
        return loaded

    monkeypatch.setattr(io, "_load_snapshot", replaced_meanwhile)
    loaded, tok = io.load_with_tokenizer(target)
    assert tok is not None and tok("Emma walked")["input_ids"] == tokenizer("Emma walked")["input_ids"]
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    monkeypatch.setattr(io, "_load_snapshot", real)
    assert io.load_with_tokenizer(target)[1] is None


# ---- every refusal before the long work ------------------------------------------------------------

from moei2 import cli  # noqa: E402
from moei2.streaming import CheckpointError, StreamedSource  # noqa: E402

QUICK = ["--num-sequences", "4", "--seq-len", "32", "--population", "8", "--generations", "3", "--quiet"]


@pytest.fixture
def model_dir(tmp_path):
    """A small Hugging Face model directory with the demo tokenizer, streamed by the CLI."""
    import shutil

    path = tmp_path / "hf"
    build_model("qwen2_moe", layers=2, vocab_size=4096).save_pretrained(str(path), max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moei2.demo_model_path() / name, path / name)
    return path


@pytest.fixture
def no_calibration(monkeypatch):
    """Fails the test if a run gets as far as calibrating layers."""
    import moei2.calibrate

    def reached(*args, **kwargs):
        raise AssertionError("the run reached calibration before refusing")

    monkeypatch.setattr(moei2.calibrate, "LayerRunner", reached)


def _refused(argv, capsys, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_model_without_tokenizer_files_is_refused(model_dir, tmp_path, capsys, no_calibration):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    out = tmp_path / "out"
    _refused(["compress", "--model", str(model_dir), "-o", str(out), *QUICK], capsys, "--model", "tokenizer")
    assert not out.exists()
    from transformers import AutoTokenizer

    empty = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    with pytest.raises(ValueError, match="tokenizer: the tokenizer has no usable vocabulary"):
        moei2.compress(str(model_dir), empty, "some text " * 100, moei2.CompressionConfig(), output=out)
    assert not out.exists()


def test_binary_calibration_file_is_refused(model_dir, tmp_path, capsys, no_calibration):
    binary = tmp_path / "calib.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    _refused(["compress", "--model", str(model_dir), "-o", str(tmp_path / "out"), "--calibration", str(binary),
              *QUICK], capsys, "--calibration", "not UTF-8")


def test_rank_budgets_refused_before_calibration(model_dir, tmp_path, capsys, no_calibration):
    _refused(["compress", "--model", str(model_dir), "-o", str(tmp_path / "out"), "--rank-keep-ratio", "0.001",
              *QUICK], capsys, "rank_keep_ratio", "average rank")
    with pytest.raises(ValueError, match="avg_rank: 1e\\+06 is above the experts' full rank"):
        moei2.compress(str(model_dir), None, "some text " * 200,
                       moei2.CompressionConfig(avg_rank=1e6, rank_keep_ratio=None), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["output_is_work_dir", "work_dir_inside_output", "report_is_output",
                                  "output_inside_model", "report_inside_model"])
def test_colliding_paths_refused_before_work(case, model_dir, tmp_path, capsys, no_calibration):
    out = tmp_path / "out"
    moei2.save(build_model("qwen2_moe", layers=2), out)  # an existing checkpoint, to be overwritten
    argv = ["compress", "--model", str(model_dir), "--overwrite", *QUICK]
    extra, option = {
        "output_is_work_dir": (["-o", str(out), "--work-dir", str(out)], "--work-dir"),
        "work_dir_inside_output": (["-o", str(out), "--work-dir", str(out / "work")], "--work-dir"),
        "report_is_output": (["-o", str(out), "--report", str(out)], "--report"),
        "output_inside_model": (["-o", str(model_dir / "out")], "--output"),
        "report_inside_model": (["-o", str(out), "--report", str(model_dir / "config.json")], "--report"),
    }[case]
    before = sorted(p.name for p in out.iterdir())
    _refused(argv + extra, capsys, f"{option}:")
    assert sorted(p.name for p in out.iterdir()) == before
    assert moei2.load(out) is not None


def test_top_k_above_expert_count_refused(model_dir, tmp_path, capsys, no_calibration):
    _edit_config(model_dir, num_experts_per_tok=9)  # of 8 experts
    _refused(["compress", "--model", str(model_dir), "-o", str(tmp_path / "out"), *QUICK], capsys, "top_k=9", "router has 8")


def test_layer_types_disagreeing_with_layer_count_refused(model_dir, tmp_path, capsys, no_calibration):
    _edit_config(model_dir, layer_types=["full_attention"])  # 2 layers
    _refused(["compress", "--model", str(model_dir), "-o", str(tmp_path / "out"), *QUICK], capsys, "--model",
             "layer_types")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_refused(model_dir, tmp_path, capsys, no_calibration):
    _refused(["compress", "--model", str(model_dir), "-o", str(tmp_path / "out"), "--device", "cuda", *QUICK],
             capsys, "device:", "no cuda device available")


def test_quiet_silences_library_progress_bars(capfd):
    with cli._library_bars(False):
        moei2.demo_model()
    assert "%|" not in capfd.readouterr().err
    with cli._library_bars(True):
        moei2.demo_model()
    assert "%|" in capfd.readouterr().err  # the bars the option silences exist


# ---- inputs checked before they are trusted ---------------------------------------------------------

def _relabel(shard, key, old, new):
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    assert header[key]["dtype"] == old
    header[key]["dtype"] = new
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n:])


def _shard_of(path, key):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_streamed_source_refuses_a_relabelled_dtype(model_dir):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    _relabel(_shard_of(model_dir, key), key, "F32", "I32")
    with pytest.raises(CheckpointError, match=f"'{key}' is stored as int32, the model built from config.json "
                                              "needs a floating-point tensor"):
        StreamedSource.open(model_dir)


def test_config_declaring_fewer_layers_than_the_weights_refused(model_dir):
    _edit_config(model_dir, num_hidden_layers=1, layer_types=["full_attention"])
    with pytest.raises(CheckpointError, match="num_hidden_layers is 1, the weights hold 2 decoder layers"):
        StreamedSource.open(model_dir)


def test_config_declaring_fewer_experts_than_the_weights_refused(model_dir):
    from safetensors.torch import load_file, save_file

    _edit_config(model_dir, num_experts=6)  # the weights hold 8
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.gate.weight' has shape .8, 32., the model built "
                                              "from config.json needs .6, 32."):
        StreamedSource.open(model_dir)
    # An expert beyond the count, with routers that agree: stored, with no place in the model.
    _edit_config(model_dir, num_experts=8)
    key = "model.layers.1.mlp.experts.8.up_proj.weight"
    shard = _shard_of(model_dir, "model.layers.1.mlp.experts.7.up_proj.weight")
    tensors = load_file(str(shard))
    tensors[key] = torch.zeros(16, 32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"][key] = shard.name
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"1 stored tensor.s. have no place in the model.*{key}"):
        StreamedSource.open(model_dir)


def test_non_finite_input_weight_named_by_file_tensor_and_layer(model_dir):
    from safetensors.torch import load_file, save_file

    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    shard = _shard_of(model_dir, key)
    tensors = load_file(str(shard))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    src = StreamedSource.open(model_dir)  # headers only: nothing read yet
    with src.layer(0):
        pass
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor '{key}' .layer 1. holds NaN"):
        with src.layer(1):
            pass


def test_config_json_is_under_the_checksums(tmp_path):
    model = build_model("qwen3_moe", layers=2)
    moei2.save(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["norm_topk_prob"] is True
    config["norm_topk_prob"] = False
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ValueError, match="config.json: checksum mismatch"):
        moei2.load(tmp_path / "ckpt")
    assert moei2.load(tmp_path / "ckpt", verify=False).config.norm_topk_prob is False  # the documented escape


def test_work_dir_file_of_another_layer_is_recomputed_not_used(tmp_path):
    import numpy as np

    from moei2.state import RunState

    state = RunState(tmp_path, "run-a")
    state.save_arrays("factors_layer1", {"x": np.ones(3)})
    state.save_arrays("factors_layer2", {"x": np.zeros(3)})
    assert np.array_equal(state.load_arrays("factors_layer2")["x"], np.zeros(3))
    (tmp_path / "factors_layer2.npz").write_bytes((tmp_path / "factors_layer1.npz").read_bytes())
    with pytest.warns(UserWarning, match="factors_layer2.npz is not used .its checksum differs"):
        assert state.load_arrays("factors_layer2") is None
    state.close()
    # A copy whose checksum is recorded too (the state edited along with it) is still refused.
    resumed = RunState(tmp_path, "run-a")
    resumed.data["arrays"]["factors_layer2"] = resumed.data["arrays"]["factors_layer1"]
    with pytest.warns(UserWarning, match="belongs to another layer or run"):
        assert resumed.load_arrays("factors_layer2") is None
    assert np.array_equal(resumed.load_arrays("factors_layer1")["x"], np.ones(3))
    resumed.close()


# ---- the work dir lock --------------------------------------------------------------------------------

def test_two_runs_sharing_a_work_dir_fail_fast(tmp_path):
    from moei2.state import RunState, WorkDirBusy

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from moei2.state import RunState; "
         "s = RunState(sys.argv[1], 'x'); print('held', flush=True); sys.stdin.read()", str(tmp_path / "work")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(WorkDirBusy, match="is in use by another run"):
            RunState(tmp_path / "work", "x")
        assert time.monotonic() - started < 5
    finally:
        holder.communicate("", timeout=30)
    state = RunState(tmp_path / "work", "x")  # free again once the other run ended
    with pytest.raises(WorkDirBusy):
        RunState(tmp_path / "work", "x")
    state.close()
    RunState(tmp_path / "work", "x").close()


def test_tokenizer_of_another_model_refused_before_calibration(tmp_path, no_calibration):
    from transformers import AutoTokenizer

    path = tmp_path / "hf"
    build_model("qwen2_moe", layers=2).save_pretrained(str(path))  # a vocabulary of 101 tokens
    demo_tokenizer = AutoTokenizer.from_pretrained(str(moei2.demo_model_path()))  # 4096 tokens
    with pytest.raises(ValueError, match="tokenizer: it gives token id .*vocabulary has 101 tokens"):
        moei2.compress(str(path), demo_tokenizer, moei2.demo_texts("calibration"), moei2.CompressionConfig(
            num_sequences=2, seq_len=32), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_report_inside_the_model_refused(model_dir, capsys):
    before = (model_dir / "config.json").read_bytes()
    _refused(["evaluate", str(model_dir), "--report", str(model_dir / "config.json")], capsys, "--report",
             "inside the input")
    assert (model_dir / "config.json").read_bytes() == before
