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
    # the dense model's count, router rows and expert biases of the dropped experts included
    assert sizes["parameters_before"] == sum(p.numel() for p in build_model(family, tie=family == "olmoe").parameters())
    assert sizes["parameters_after"] == sum(p.numel() for p in model.parameters())
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
    with pytest.raises(ValueError, match="config.json: checksum mismatch"):
        moei2.load(saved)
    # Without the checksums, the record is still checked against the weights.
    with pytest.raises(ValueError, match="has shape"):
        moei2.load(saved, verify=False)
    config["moei2"]["layers"]["0"]["kept"] = [0, 9]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'kept' must be increasing distinct expert indices"):
        moei2.load(saved, verify=False)
    config["moei2"]["layers"]["2"]["ranks"] = None  # low-rank tensors in the file, dense experts recorded
    config["moei2"]["layers"]["0"]["kept"] = [0, 2, 3, 4, 6, 7]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the recorded layout"):
        moei2.load(saved, verify=False)


def test_bad_metadata(saved):
    (saved / META_NAME).write_text("{not json")
    assert not moei2.is_moei2_checkpoint(saved)
    with pytest.raises(ValueError, match="not valid JSON"):
        moei2.load(saved)
    (saved / META_NAME).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="unknown checkpoint format 99"):
        moei2.inspect_checkpoint(saved)


# ---- the sharded layout, the writer, and the hardening ----------------------------------------

import errno  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from moei2.io import INDEX_NAME, CheckpointWriter  # noqa: E402


def _save_format1(model, path):
    """A checkpoint as moei2 wrote it before the sharded layout: one moei2_model.safetensors."""
    import copy

    from safetensors.torch import save_file

    from moei2.checkpoint_writer import _LOADER_SOURCE, _unique_state_dict
    from moei2.io import LOADER_CLASS, LOADER_NAME
    from moei2.models import structure_of

    adapter = get_adapter(model)
    tensors, aliases = _unique_state_dict(model)
    path.mkdir()
    save_file(tensors, str(path / "moei2_model.safetensors"), metadata={"format": "pt", "moei2_format": "1"})
    config = copy.deepcopy(model.config)
    config.moei2 = structure_of(model, adapter)
    config.architectures = [type(model).__name__]
    config.auto_map = {"AutoModelForCausalLM": f"{LOADER_NAME[:-3]}.{LOADER_CLASS}"}
    config.save_pretrained(str(path))
    (path / LOADER_NAME).write_text(_LOADER_SOURCE)
    meta = {"format": 1, "architecture": type(model).__name__, "family": adapter.family, "dtype": "float32",
            "weights": "moei2_model.safetensors", "num_tensors": len(tensors) + len(aliases), "aliases": aliases,
            "sizes": {}}
    (path / META_NAME).write_text(json.dumps(meta))
    return path


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_format1_checkpoints_still_load(tmp_path):
    model = compressed("olmoe", tie=True)
    ids = input_ids(2, 7)
    old = _save_format1(model, tmp_path / "old")
    loaded = moei2.load(old)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert moei2.inspect_checkpoint(old)["format"] == 1
    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(str(old), trust_remote_code=True)
    assert torch.equal(logits(auto, ids), logits(model, ids))
    # Saving over an old checkpoint replaces it with the new layout.
    moei2.save(model, old, overwrite=True)
    assert moei2.inspect_checkpoint(old)["format"] == 2 and not (old / "moei2_model.safetensors").exists()


def test_several_shards(tmp_path):
    model = compressed("deepseek_v2")
    ids = input_ids(2, 7)
    moei2.save(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("moei2_model-*.safetensors"))
    assert len(shards) > 3 and shards[-1] == SHARD_PATTERN.format(len(shards), len(shards))
    index = json.loads((tmp_path / "ckpt" / INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    info = moei2.inspect_checkpoint(tmp_path / "ckpt")
    assert info["num_tensors"] == len(model.state_dict())
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), trust_remote_code=True)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_writer_used_layer_by_layer(tmp_path):
    """The streamed pipeline's use: one add() per finished layer, then finish()."""
    from moei2.checkpoint_writer import _sizes, _unique_state_dict
    from moei2.models import structure_of

    model = compressed("qwen2_moe")
    adapter = get_adapter(model)
    tensors, aliases = _unique_state_dict(model)
    record = structure_of(model, adapter)
    sizes = _sizes(model, adapter, record, tensors)
    with CheckpointWriter(tmp_path / "ckpt", max_shard_bytes=50_000) as w:
        assert w.staging.parent == tmp_path and w.staging.name.startswith(".ckpt.moei2-tmp-")
        for i in range(adapter.num_hidden_layers):
            w.add({k: v for k, v in tensors.items() if k.startswith(f"model.layers.{i}.")})
            assert not (tmp_path / "ckpt").exists()
        w.add({k: v for k, v in tensors.items() if not k.startswith("model.layers.")})
        with pytest.raises(ValueError, match="added twice"):
            w.add({"model.norm.weight": tensors["model.norm.weight"]})
        out = w.finish(model.config, record, architecture=type(model).__name__, family=adapter.family,
                       dtype="float32", aliases=aliases, sizes=sizes)
    assert out["path"] == str(tmp_path / "ckpt") and out["file_bytes"] > sizes["bytes_after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    ids = input_ids(2, 5)
    assert torch.equal(logits(moei2.load(tmp_path / "ckpt"), ids), logits(model, ids))
    with pytest.raises(RuntimeError, match="already finished"):
        w.add({"x": torch.zeros(1)})
    # Leaving the block with an exception, or without finish(), publishes nothing.
    with pytest.raises(KeyError):
        with CheckpointWriter(tmp_path / "other") as w:
            w.add({"model.norm.weight": tensors["model.norm.weight"]})
            raise KeyError("stop")
    with CheckpointWriter(tmp_path / "other") as w:
        w.add({"model.norm.weight": tensors["model.norm.weight"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_writer_checks_the_output_location_first(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        CheckpointWriter(tmp_path / "file")
    with pytest.raises(PermissionError, match="cannot create its parent"):
        CheckpointWriter(tmp_path / "file" / "ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="not a moei2 checkpoint"):
        CheckpointWriter(tmp_path / "full", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        CheckpointWriter(tmp_path / "full")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        CheckpointWriter(tmp_path / "ckpt", max_shard_bytes=0)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(PermissionError, match="not writable"):
            CheckpointWriter(tmp_path / "ro" / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full", "ro"][: 3 if os.geteuid() else 2]


def test_non_finite_weights_are_not_saved(tmp_path):
    model = compressed("mixtral")
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="model.norm.weight.*NaN"):
        moei2.save(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _tensor_span(path, key):
    from moei2.io import SafetensorsFile

    f = SafetensorsFile(path)
    info = f.tensors[key]
    return f.data_offset + info.start, f.data_offset + info.end


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_flipped_byte_is_refused(saved):
    start, end = _tensor_span(saved / SHARD, "model.layers.1.mlp.gate.weight")
    with open(saved / SHARD, "rb") as f:
        f.seek(start + 5)
        byte = f.read(1)[0]
    _patch(saved / SHARD, start + 5, bytes([byte ^ 0x10]))
    with pytest.raises(ValueError, match=f"{SHARD}: checksum mismatch.*verify=False"):
        moei2.load(saved)
    moei2.load(saved, verify=False)  # documented: the checksum is what catches a flipped byte


def test_nan_in_a_tensor_is_refused(saved):
    import struct

    start, _ = _tensor_span(saved / SHARD, "model.norm.weight")
    _patch(saved / SHARD, start + 8, struct.pack("<f", float("nan")))
    with pytest.raises(ValueError, match="checksum mismatch"):
        moei2.load(saved)
    with pytest.raises(ValueError, match="'model.norm.weight' contains NaN"):
        moei2.load(saved, verify=False)


def test_relabelled_dtype_is_refused(saved, tmp_path):
    data = (saved / SHARD).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = "model.layers.0.mlp.gate.weight"
    assert header[key]["dtype"] == "F32"
    relabelled = data[8:8 + n].replace(
        json.dumps({key: header[key]}, separators=(",", ":"))[1:-1].encode(),
        json.dumps({key: dict(header[key], dtype="I32")}, separators=(",", ":"))[1:-1].encode())
    assert relabelled != data[8:8 + n] and len(relabelled) == n
    (saved / SHARD).write_bytes(data[:8] + relabelled + data[8 + n:])
    for verify in (True, False):
        with pytest.raises(ValueError, match=f"{key}' is stored as int32.*records"):
            moei2.load(saved, verify=verify)
    # The single-file layout has no record of dtypes: a float tensor stored as int is refused too.
    old = _save_format1(compressed("qwen3_moe"), tmp_path / "old")
    data = (old / "moei2_model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    relabelled = data[8:8 + n].replace(b'"model.norm.weight":{"dtype":"F32"', b'"model.norm.weight":{"dtype":"I32"')
    assert relabelled != data[8:8 + n]
    (old / "moei2_model.safetensors").write_bytes(data[:8] + relabelled + data[8 + n:])
    with pytest.raises(ValueError,
                       match="'model.norm.weight' is stored as int32, the recorded layout needs a floating"):
        moei2.load(old)


def test_checksums_are_recorded(saved):
    import hashlib

    meta = json.loads((saved / META_NAME).read_text())
    assert meta["files"][SHARD]["sha256"] == hashlib.sha256((saved / SHARD).read_bytes()).hexdigest()
    assert meta["tensors"]["model.norm.weight"] == {"dtype": "float32", "shape": [32], "file": SHARD}


def test_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    model = compressed("deepseek_v2")
    moei2.save(model, tmp_path / "a", report={"b": 1, "a": 2}, max_shard_bytes=30_000)
    moei2.save(model, tmp_path / "b", report={"a": 2, "b": 1}, max_shard_bytes=30_000)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_absurd_record_is_refused_before_allocation(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["moei2"]["layers"]["2"]["ranks"][0] = [2, 10**12, 3]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer 2 expert 0 has rank 1000000000000"):
        moei2.load(saved, verify=False)
    config["moei2"]["layers"]["2"]["ranks"][0] = [2, 3, 4]
    config["moei2"]["layers"]["1"]["num_experts"] = 10**9
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records 1000000000 experts"):
        moei2.load(saved, verify=False)


def test_permissions_follow_the_umask(tmp_path):
    model = compressed("olmoe")
    old = os.umask(0o022)
    try:
        moei2.save(model, tmp_path / "ckpt")
        model.save_pretrained(str(tmp_path / "hf"))
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == (tmp_path / "hf").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ckpt").iterdir()}
    assert set(modes.values()) == {(tmp_path / "hf" / "config.json").stat().st_mode & 0o777} == {0o644}, modes


def _full_disk_after(monkeypatch, budget):
    written = [0]
    real = CheckpointWriter._write

    def write(self, f, data):
        written[0] += len(data)
        if written[0] > budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, f, data)

    monkeypatch.setattr(CheckpointWriter, "_write", write)


@pytest.mark.parametrize("budget", [100, 30_000, 10**9])
def test_full_disk_leaves_no_partial_output(tmp_path, monkeypatch, budget):
    model = compressed("qwen2_moe")
    moei2.save(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    before = _files(tmp_path / "ckpt")
    moei2.prune_experts(model, {1: [0]})
    if budget == 10**9:  # the disk fills while the last small file is written
        sizes = sum(len(v) for k, v in before.items() if k != META_NAME)
        budget = sizes + 10
    _full_disk_after(monkeypatch, budget)
    with pytest.raises(OSError, match="No space left"):
        moei2.save(model, tmp_path / "ckpt", overwrite=True, max_shard_bytes=20_000)
    with pytest.raises(OSError, match="No space left"):
        moei2.save(model, tmp_path / "new", max_shard_bytes=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert _files(tmp_path / "ckpt") == before


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_replacement_is_one_exchange(tmp_path, monkeypatch):
    import moei2.atomic_dir as mio

    model = compressed("olmoe")
    moei2.save(model, tmp_path / "ckpt")
    calls = []
    real = mio._renameat2_exchange

    def exchange(a, b):
        calls.append((a, b))
        ok = real(a, b)
        assert ok, "this filesystem refuses RENAME_EXCHANGE"
        assert (b / META_NAME).is_file()  # the path never lacks a checkpoint
        return ok

    monkeypatch.setattr(mio, "_renameat2_exchange", exchange)
    moei2.prune_experts(model, {1: [0]})
    moei2.save(model, tmp_path / "ckpt", overwrite=True)
    assert len(calls) == 1 and calls[0][1] == (tmp_path / "ckpt")
    assert moei2.inspect_checkpoint(tmp_path / "ckpt")["layers"][1]["num_kept"] == EXPERTS - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_fallback_without_exchange_and_recovery(tmp_path, monkeypatch):
    import moei2.atomic_dir as mio

    model = compressed("olmoe")
    target = tmp_path / "ckpt"
    moei2.save(model, target)
    before = _files(target)
    monkeypatch.setattr(mio, "_renameat2_exchange", lambda a, b: False)
    # A crash between the fallback's two renames: the old checkpoint sits under a backup name of
    # a process that is gone, and nothing is at the path.
    backup = tmp_path / f".ckpt.moei2-old-{_dead_pid()}-0-abcd"
    os.rename(target, backup)
    assert moei2.is_moei2_checkpoint(backup) and not target.exists()
    loaded = moei2.load(target)  # load puts it back
    assert _files(target) == before and not backup.exists()
    ids = input_ids(2, 5)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # The fallback itself replaces the checkpoint.
    moei2.prune_experts(model, {1: [0]})
    moei2.save(model, target, overwrite=True)
    assert moei2.inspect_checkpoint(target)["layers"][1]["num_kept"] == EXPERTS - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_staging_directories_are_removed(tmp_path):
    dead = tmp_path / f".ckpt.moei2-tmp-{_dead_pid()}-0-0001"
    dead.mkdir()
    (dead / "moei2_model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".ckpt.moei2-tmp-{os.getpid()}-{open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]}-0002"
    live.mkdir()
    unrelated = tmp_path / ".ckpt.tmp-keep"
    unrelated.mkdir()
    moei2.save(compressed("olmoe"), tmp_path / "ckpt")
    assert not dead.exists() and live.exists() and unrelated.exists()
