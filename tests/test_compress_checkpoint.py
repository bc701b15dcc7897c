"""moei2.compress on a checkpoint directory: streamed from its shards, written as layers finish, the
same choices and logits as the in-memory run, resumable, and refusing bad input before any work."""
import json

import pytest

torch = pytest.importorskip("torch")

import moei2  # noqa: E402
from moei2 import lowrank  # noqa: E402
from moei2.config import LoRAConfig  # noqa: E402

from .test_pipeline import CharTokenizer, calibration_texts, count_calls, small_config  # noqa: E402
from .tiny_models import build_model  # noqa: E402


def _checkpoint(tmp_path, family, layers=4):
    path = tmp_path / f"{family}-hf"
    build_model(family, layers=layers).save_pretrained(str(path), max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_streamed_run_equals_the_in_memory_run(tmp_path, family):
    config = small_config(kt_block=2)
    source_dir = _checkpoint(tmp_path, family)
    reference, ref_report = moei2.compress(build_model(family, layers=4), CharTokenizer(), calibration_texts(),
                                           config, progress=False)
    out = tmp_path / "out"
    path, report = moei2.compress(source_dir, CharTokenizer(), calibration_texts(), config, output=out,
                                  progress=False)
    assert path == out and moei2.is_moei2_checkpoint(out)
    for l, info in ref_report["layers"].items():
        assert report["layers"][l]["dropped"] == info["dropped"]
        assert report["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
    assert report["parameters"] == ref_report["parameters"]
    assert report["checkpoint"]["routed_expert_parameters_after"] == ref_report["parameters"]["routed_expert_after"]
    loaded = moei2.load(out)
    assert loaded.config.moei2 == reference.config.moei2
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
    saved = json.loads((out / "report.json").read_text())
    assert saved["layers"] == json.loads(json.dumps(report["layers"]))


def test_bfloat16_checkpoint_is_written_in_bfloat16(tmp_path):
    path = tmp_path / "bf16"
    build_model("olmoe", layers=2, dtype=torch.bfloat16).save_pretrained(str(path), max_shard_size="20KB")
    out = tmp_path / "out"
    _, report = moei2.compress(path, CharTokenizer(), calibration_texts(), small_config(), output=out,
                               progress=False)
    assert json.loads((out / "moei2.json").read_text())["dtype"] == "bfloat16"
    loaded = moei2.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert report["parameters"]["model_bytes_after"] == 2 * sum(p.numel() for p in loaded.parameters())
    assert report["checkpoint"]["bytes_after"] == report["parameters"]["model_bytes_after"]


def test_interrupted_streamed_run_resumes_to_the_same_checkpoint(tmp_path, monkeypatch):
    config = small_config()
    source_dir = _checkpoint(tmp_path, "qwen2_moe")
    moei2.compress(source_dir, CharTokenizer(), calibration_texts(), config, output=tmp_path / "whole",
                   progress=False)
    calls = count_calls(monkeypatch, lowrank, "decompose_many", interrupt_at=3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        moei2.compress(source_dir, CharTokenizer(), calibration_texts(), config, output=out,
                       work_dir=tmp_path / "work", progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "moei2-tmp" in p.name] == []
    calls["n"] = 0
    moei2.compress(source_dir, CharTokenizer(), calibration_texts(), config, output=out,
                   work_dir=tmp_path / "work", progress=False)
    assert calls["n"] == 2  # only the layers that had not been decomposed
    whole, resumed = moei2.load(tmp_path / "whole"), moei2.load(out)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_input_fails_before_any_work(tmp_path, monkeypatch):
    import moei2.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(pipeline, "calibration_windows", no_work)
    source_dir = _checkpoint(tmp_path, "mixtral")
    args = (CharTokenizer(), calibration_texts(), small_config())
    with pytest.raises(ValueError, match="output"):
        moei2.compress(source_dir, *args, progress=False)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        moei2.compress(source_dir, *args, output=tmp_path / "a-file", progress=False)
    shard = sorted(source_dir.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=shard.name):
        moei2.compress(source_dir, *args, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="only a checkpoint directory"):
        moei2.compress(build_model("mixtral", layers=2), *args, output=tmp_path / "out", progress=False)


def test_lora_after_a_streamed_run_recovers_the_written_checkpoint(tmp_path):
    config = small_config(lora=LoRAConfig(steps=2, batch_size=2, seq_len=16))
    source_dir = _checkpoint(tmp_path, "mixtral", layers=2)
    out = tmp_path / "out"
    _, report = moei2.compress(source_dir, CharTokenizer(), calibration_texts(), config, output=out,
                               progress=False)
    assert report["lora"]["steps"] == 2 and "lora" in report["times"]
    loaded = moei2.load(out)
    assert json.loads((out / "report.json").read_text())["lora"]["steps"] == 2
    assert torch.isfinite(_logits(loaded, torch.randint(3, 100, (1, 8)))).all()


def test_cli_streams_a_model_directory(tmp_path, capsys):
    import shutil

    from moei2 import cli

    source_dir = tmp_path / "hf"
    build_model("qwen2_moe", layers=2, vocab_size=4096).save_pretrained(str(source_dir), max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(moei2.demo_model_path() / name, source_dir / name)
    out = tmp_path / "out"
    argv = ["compress", "--model", str(source_dir), "-o", str(out), "--num-sequences", "4", "--seq-len", "32",
            "--population", "8", "--generations", "3", "--quiet", "--report", str(tmp_path / "report.json")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "routed expert parameters" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checkpoint"]["path"] == str(out.absolute())
    loaded = moei2.load(out)
    assert loaded.config.moei2["layers"]["0"]["kept"] == report["layers"]["0"]["kept"]
    assert (out / "tokenizer.json").is_file()
    # a second run refuses to overwrite without --overwrite, before any work
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
