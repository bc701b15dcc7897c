"""StreamedSource: layers read from sharded checkpoints equal the in-memory model bit for bit; bad
directories are refused up front with the file or tensor named."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2.streaming import CheckpointError, StreamedSource  # noqa: E402

from .tiny_models import FAMILIES, build_model, input_ids  # noqa: E402


def _save(model, path, shard="20KB"):
    model.save_pretrained(str(path), max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        out[family] = _save(build_model(family, tie=family == "olmoe"), root / family)
    return out


def _in_memory(family):
    """The model the checkpoint was saved from. (``from_pretrained`` leaves small tensors in
    unaligned memory maps, where BLAS may sum in another order: its parameters are compared, its
    outputs only to float tolerance.)"""
    return build_model(family, tie=family == "olmoe")


def _reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _capture_layer_calls(model, ids):
    """Each decoder layer's (args, kwargs, output) during one forward of ``model``."""
    calls = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, output, i=i):
            calls[i] = (args, kwargs, output)
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        out = model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return calls, out


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_layers_equal_in_memory(family, checkpoints):
    path = checkpoints[family]
    assert len(list(path.glob("model-*.safetensors"))) > 3
    ref = _reference(path)
    memory = _in_memory(family)
    ids = input_ids(2, 9)
    calls, ref_out = _capture_layer_calls(memory, ids)
    src = StreamedSource.open(path)
    assert src.streamed and src.device == torch.device("cpu") and src.dtype == torch.float32
    assert src.adapter.family == family and src.adapter.model is src.model
    ref_state = ref.state_dict()
    for i in range(len(ref.model.layers)):
        with src.layer(i) as layer:
            assert layer is src.model.model.layers[i]
            for name, value in layer.state_dict().items():
                assert torch.equal(value, ref_state[f"model.layers.{i}.{name}"]), name
            args, kwargs, expected = calls[i]
            with torch.no_grad():
                got = layer(*args, **kwargs)
            assert torch.equal(_first(got), _first(expected))
        assert all(p.device.type == "meta" for p in src.model.model.layers[i].parameters())
        assert all(p.device.type == "meta" for p in layer.parameters())
    with src.outer() as model:
        with torch.no_grad():
            embeds = model.model.embed_tokens(ids)
            assert torch.equal(embeds, memory.model.embed_tokens(ids))
            position_ids = torch.arange(ids.shape[1])[None]
            got = model.model.rotary_emb(embeds, position_ids)
            want = memory.model.rotary_emb(embeds, position_ids)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            logits = model.lm_head(model.model.norm(_first(calls[len(calls) - 1][2])))
        assert torch.equal(logits, ref_out.logits)
        torch.testing.assert_close(logits, ref(ids, use_cache=False).logits)
    assert all(p.device.type == "meta" for p in src.model.parameters())
    stored = src.outer_tensors()
    assert set(stored) == {"model.embed_tokens.weight", "model.norm.weight"} | (
        set() if family == "olmoe" else {"lm_head.weight"})
    from moei2.source import InMemorySource

    assert src.fingerprint() == InMemorySource(ref).fingerprint()


def test_changes_inside_the_scope_are_dropped(checkpoints):
    src = StreamedSource.open(checkpoints["qwen2_moe"])
    layer_index = src.adapter.moe_layer_indices[0]
    with src.layer(layer_index) as layer:
        src.adapter.prune_layer(layer, [0, 1, 2])
        assert src.adapter.view(layer_index).num_experts == 5
        with pytest.raises(RuntimeError, match="already materialised"):
            with src.layer(layer_index):
                pass
    assert src.adapter.view(layer_index).num_experts == 8
    assert src.model.model.layers[layer_index].self_attn.config is src.model.config
    # Several layers at once (one block).
    with src.layer(0) as a, src.layer(1) as b:
        assert a.mlp.gate.weight.device.type == "cpu" and b.mlp.gate.weight.device.type == "cpu"
    with pytest.raises(IndexError, match="out of range"):
        with src.layer(7):
            pass


def test_dtype_and_single_file(tmp_path):
    model = build_model("mixtral", dtype=torch.bfloat16)
    model.save_pretrained(str(tmp_path / "m"))  # one model.safetensors
    src = StreamedSource.open(tmp_path / "m")
    assert src.storage_dtype == torch.bfloat16 and src.dtype == torch.float32
    with src.layer(1) as layer:
        assert torch.equal(layer.mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj.float())
    src = StreamedSource.open(tmp_path / "m", dtype="bfloat16")
    with src.layer(1) as layer:
        assert torch.equal(layer.mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj)
    assert src.outer_tensors()["model.norm.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        StreamedSource.open(tmp_path / "m", dtype="int8")


# ---- bad directories ----------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    return _save(build_model("deepseek_v2"), tmp_path / "m")


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def test_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StreamedSource.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        StreamedSource.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        StreamedSource.open(tmp_path / "empty")


def test_missing_config(sharded):
    (sharded / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        StreamedSource.open(sharded)


def test_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        StreamedSource.open(sharded)


def test_index_naming_absent_tensor(sharded):
    index = _index(sharded)
    index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"] = index["weight_map"]["model.norm.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="absent from their shard.*experts.3.up_proj"):
        StreamedSource.open(sharded)


def test_tensor_missing_from_every_shard(sharded):
    index = _index(sharded)
    shard = index["weight_map"].pop("model.layers.2.mlp.experts.5.down_proj.weight")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="experts.5.down_proj.weight"):
        StreamedSource.open(sharded)
    index["weight_map"]["model.layers.2.mlp.experts.5.down_proj.weight"] = shard
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="self_attn.o_proj.weight"):
        StreamedSource.open(sharded)


def test_wrong_shape(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["moe_intermediate_size"] = 12
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        StreamedSource.open(sharded)


@pytest.mark.parametrize("key, value, message", [
    ("n_routed_experts", 6, "has shape"),   # fewer experts than the weights hold
    ("n_routed_experts", 10, "in no weights file"),  # more
    ("num_experts_per_tok", 9, "top_k=9 experts but its router has 8"),
])
def test_expert_count_or_top_k_contradicting_the_weights(sharded, key, value, message):
    """Refused when the checkpoint is opened, before any calibration."""
    config = json.loads((sharded / "config.json").read_text())
    config[key] = value
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        StreamedSource.open(sharded)


def test_corrupt_shard_header(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        StreamedSource.open(sharded)


def test_unsupported_architecture(sharded):
    config = json.loads((sharded / "config.json").read_text())
    config["architectures"], config["model_type"] = ["LlamaForCausalLM"], "llama"
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not supported; supported: DeepseekV2ForCausalLM"):
        StreamedSource.open(sharded)


def test_already_compressed(tmp_path):
    moei2.save(build_model("olmoe"), tmp_path / "c")
    with pytest.raises(CheckpointError, match="already compressed by moei2; compress the original model"):
        StreamedSource.open(tmp_path / "c")


def test_pytorch_bin_only(tmp_path):
    (tmp_path / "m").mkdir()
    build_model("olmoe").config.save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        StreamedSource.open(tmp_path / "m")


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_scale_benchmark_checkpoints_stream(family, tmp_path, monkeypatch):
    """benchmarks/scale.py writes the real checkpoints' layout (per-expert keys); shrunk widths here."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).parent.parent / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    small = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "vocab_size": 128,
             "shared_expert_intermediate_size": 48, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
             "v_head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 2 if family == "mixtral" else 4}
    config = {k: v for k, v in scale.REAL_CONFIGS[family].items()}
    config.update({k: v for k, v in small.items() if k in config})
    monkeypatch.setitem(scale.REAL_CONFIGS, family, config)
    out = scale.write_checkpoint(tmp_path / "m", family, 2, shard_bytes=40_000)
    assert out["files"] > 2
    keys = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    expert = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.1.{expert}.weight" in keys
    src = StreamedSource.open(tmp_path / "m")
    assert src.storage_dtype == torch.bfloat16 and src.checkpoint_bytes == out["bytes"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    with src.layer(1) as layer:
        for name, value in layer.state_dict().items():
            assert torch.equal(value, ref.state_dict()[f"model.layers.1.{name}"]), name
        assert float(layer.input_layernorm.weight.detach().min()) == 1.0
    src.fingerprint()
