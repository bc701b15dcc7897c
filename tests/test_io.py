"""Saving and loading compressed checkpoints: identical logits, atomic writes, clear errors."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2.io import CONFIG_NAME, META_NAME, SHARD_PATTERN  # noqa: E402
from moei2.models import get_adapter  # noqa: E402

from .tiny_models import EXPERTS, FAMILIES, build_model, input_ids  # noqa: E402

SHARD = SHARD_PATTERN.format(1, 1)  # one shard at the default shard size


def compressed(family, tie=False):
    """A model with different expert counts per layer and one low-rank layer with per-expert ranks."""
    model = build_model(family, tie=tie)
    adapter = get_adapter(model)
    layers = adapter.moe_layer_indices
    moei2.prune_experts(model, {layers[0]: [1, 5], layers[-1]: [0, 2, 6]})
    view = adapter.view(layers[-1])
    factors = {}
    for j in range(view.num_experts):
        factors[j] = {}
        for name, w, rank in zip(("gate", "up", "down"), view.expert(j), (2 + j, 3, 4 + j % 2)):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            factors[j][name] = (u[:, :rank] * s[:rank], vh[:rank])
    moei2.lowrank_experts(model, {layers[-1]: factors})
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_logits(family, tmp_path):
    model = compressed(family, tie=family == "olmoe")
    ids = input_ids(2, 9)
    before = logits(model, ids)
    sizes = moei2.save(model, tmp_path / "ckpt", report={"note": "tiny"})
    assert sizes["bytes_after"] < sizes["bytes_before"]
    assert sizes["routed_expert_parameters_after"] < sizes["routed_expert_parameters_before"]
    assert sizes["file_bytes"] > sizes["bytes_after"]
    assert moei2.is_moei2_checkpoint(tmp_path / "ckpt")
    loaded = moei2.load(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(logits(loaded, ids), before)
    assert loaded.config.moei2 == model.config.moei2
    # The experts the record keeps are the model's, in layer order, with their ranks.
    info = moei2.inspect_checkpoint(tmp_path / "ckpt")
    layers = get_adapter(model).moe_layer_indices
    assert info["architecture"] == type(model).__name__ and info["family"] == family
    assert info["layers"][layers[0]]["kept"] == [0, 2, 3, 4, 6, 7]
    assert info["layers"][layers[-1]]["kept"] == [1, 3, 4, 5, 7]
    assert info["layers"][layers[-1]]["ranks"] == [[2 + j, 3, 4 + j % 2] for j in range(5)]
    assert info["experts_kept"] == len(layers) * EXPERTS - 5 and info["has_report"]
    assert json.loads((tmp_path / "ckpt" / "report.json").read_text()) == {"note": "tiny"}
    if family == "olmoe":  # tied embeddings are stored once and stay tied
        assert "lm_head.weight" in json.loads((tmp_path / "ckpt" / META_NAME).read_text())["aliases"]
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_auto_model_with_trust_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model = compressed("qwen2_moe")
    ids = input_ids(2, 6)
    moei2.save(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), trust_remote_code=True)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # Without the loader, transformers cannot silently build the uncompressed layout.
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), trust_remote_code=False)


def test_load_in_another_dtype(tmp_path):
    model = compressed("mixtral")
    moei2.save(model, tmp_path / "ckpt")
    loaded = moei2.load(tmp_path / "ckpt", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        moei2.load(tmp_path / "ckpt", dtype="int8")


def test_existing_path_and_overwrite(tmp_path):
    model = compressed("olmoe")
    target = tmp_path / "ckpt"
    moei2.save(model, target)
    stamp = (target / SHARD).stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        moei2.save(model, target)
    assert (target / SHARD).stat().st_mtime_ns == stamp
    moei2.prune_experts(model, {1: [0]})
    moei2.save(model, target, overwrite=True)
    assert moei2.inspect_checkpoint(target)["layers"][1]["num_kept"] == EXPERTS - 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a moei2 checkpoint"):
        moei2.save(model, other, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]


def test_failed_save_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    model = compressed("deepseek_v2")
    with pytest.raises(RuntimeError, match="disk full"):
        moei2.save(model, tmp_path / "ckpt", tokenizer=BrokenTokenizer())
    with pytest.raises(ValueError, match="JSON"):
        moei2.save(model, tmp_path / "ckpt", report={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    moei2.save(compressed("qwen3_moe"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        moei2.load(tmp_path / "nowhere")
    assert not moei2.is_moei2_checkpoint(tmp_path / "nowhere")
    (saved / SHARD).unlink()
    with pytest.raises(FileNotFoundError, match=SHARD):
        moei2.load(saved)


def test_truncated_weights(saved):
    data = (saved / SHARD).read_bytes()
    (saved / SHARD).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        moei2.load(saved)


def test_record_not_matching_weights(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["moei2"]["layers"]["0"]["kept"] = [0, 1]  # two experts where the file holds six
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        moei2.load(saved)
    config["moei2"]["layers"]["0"]["kept"] = [0, 9]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'kept' must be increasing distinct expert indices"):
        moei2.load(saved)
    config["moei2"]["layers"]["2"]["ranks"] = None  # low-rank tensors in the file, dense experts recorded
    config["moei2"]["layers"]["0"]["kept"] = [0, 2, 3, 4, 6, 7]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the recorded layout"):
        moei2.load(saved)


def test_bad_metadata(saved):
    (saved / META_NAME).write_text("{not json")
    assert not moei2.is_moei2_checkpoint(saved)
    with pytest.raises(ValueError, match="not valid JSON"):
        moei2.load(saved)
    (saved / META_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="unknown checkpoint format 99"):
        moei2.inspect_checkpoint(saved)
