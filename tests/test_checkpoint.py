"""The one reader of model directories (moei2.checkpoint.Checkpoint) and the dtype names."""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from moei2.dtypes import dtype_name, resolve_dtype, torch_dtype  # noqa: E402

from .tiny_models import build_model  # noqa: E402


@pytest.mark.parametrize("value, want", [("float32", torch.float32), ("torch.bfloat16", torch.bfloat16),
                                         (torch.float16, torch.float16), ("half", torch.float16),
                                         ("float64", torch.float64)])
def test_dtype_names_resolve(value, want):
    assert torch_dtype(value) is want
    assert dtype_name(want) == str(want).removeprefix("torch.") and dtype_name("torch.bfloat16") == "bfloat16"


@pytest.mark.parametrize("value", ["int8", torch.int32, "float8_e4m3fn", "floaty", 3, None])
def test_dtype_names_refused(value):
    with pytest.raises(ValueError, match="^--dtype must be one of float32, float64, bfloat16, float16"):
        torch_dtype(value, "--dtype")


def test_none_is_the_callers_default():
    assert resolve_dtype(None) is None and resolve_dtype("bfloat16") is torch.bfloat16


def test_one_reader_for_both_kinds_of_directory(tmp_path):
    model = build_model("olmoe").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "hf"))
    key = "model.layers.0.mlp.gate.weight"
    router_shape = tuple(model.state_dict()[key].shape)
    moei2.prune_experts(model, {0: [1]})
    moei2.save(model, tmp_path / "ckpt")

    plain = Checkpoint.open_pretrained(tmp_path / "hf")
    assert plain.record is None and not plain.is_moei2
    assert plain.adapter_class().architecture == "OlmoeForCausalLM"
    assert plain.storage_dtype == torch.bfloat16
    assert plain.tensor(key).shape == router_shape and plain.file_of(key).name == "model.safetensors"
    skeleton = plain.skeleton(torch.float32)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert tuple(skeleton.state_dict()[key].shape) == router_shape

    with Checkpoint.open_moei2(tmp_path / "ckpt") as compressed:
        assert compressed.is_moei2 and compressed.record == model.config.moei2
        assert compressed.adapter_class() is plain.adapter_class()
        assert compressed.storage_dtype == torch.bfloat16
        index = compressed.index()
        pruned = compressed.skeleton(torch.float32)
        # the skeleton has the recorded layout: layer 0 lost one expert
        assert tuple(pruned.state_dict()[key].shape) == (router_shape[0] - 1, router_shape[1])
        assert compressed.tensor(key).shape == (router_shape[0] - 1, router_shape[1]) and key in index

    with pytest.raises(CheckpointError, match="already compressed by moei2"):
        Checkpoint.open_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="has no moei2.json: not a moei2 checkpoint"):
        with Checkpoint.open_moei2(tmp_path / "hf"):
            pass


def test_unsupported_architecture_is_named_once(tmp_path):
    model = build_model("olmoe")
    model.save_pretrained(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    checkpoint = Checkpoint.open(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"config.json: architecture \['LlamaForCausalLM'\] is not supported; "
                                         "supported: .*OlmoeForCausalLM"):
        checkpoint.adapter_class()
