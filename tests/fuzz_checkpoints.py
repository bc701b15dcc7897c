"""Corrupts checkpoints at random and reads them with both readers: ``moei2.load`` on a moei2
checkpoint and :class:`moei2.streaming.StreamedSource` on a Hugging Face model directory.

Run as a script (tests/test_fuzz_checkpoints.py runs it in a subprocess):
``python tests/fuzz_checkpoints.py SEED CASES``. Each case copies a pristine checkpoint, damages
it in one way (safetensors header bytes, a tensor's dtype, shape or data offsets, the header
length, truncation, config.json and moei2.json values, the index) and reads it. A read may
succeed or raise ValueError / OSError (the documented refusals); anything else, a signal or a
hang fails. A success must give what was saved: ``load`` (checksums on) the original weights,
the streamed source finite floating-point layers of the stored shapes. The case being run is
printed to stderr first, so the last line names the culprit.
"""
import json
import os
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moei2  # noqa: E402
from moei2.streaming import StreamedSource  # noqa: E402
from tiny_models import build_model  # noqa: E402

warnings.filterwarnings("ignore")
rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
CASES = int(sys.argv[2]) if len(sys.argv) > 2 else 40
ALLOWED = (ValueError, OSError)
HOSTILE = [None, True, -1, 0, 1, 3, 2**31, 2**63, -(2**63), 1e308, float("nan"), "x", [], {}, [1, 2], "F32", "I32",
           "BF16", "F64", "U8", [8, 32], [0], [-4, 8]]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX"]


def read_header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data, n, json.loads(data[8:8 + n])


def write_header(path, data, n, header):
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def corrupt_shard(path):
    data, n, header = read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    kind = rng.randrange(8)
    if kind == 0:
        header[key]["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        header[key]["shape"] = rng.choice(HOSTILE) if rng.random() < 0.5 else list(reversed(header[key]["shape"]))
    elif kind == 2:
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[start + 4, end + 4], [end, start], [start, end * 1000],
                                                  [0, end - start], rng.choice(HOSTILE)])
    elif kind == 3:
        header[key] = rng.choice(HOSTILE)
    elif kind == 4:  # random bytes in the header
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[8 + rng.randrange(n)] = rng.randrange(256)
        path.write_bytes(bytes(buf))
        return f"{path.name}: header bytes"
    elif kind == 5:  # the header length
        path.write_bytes(rng.choice([0, 7, n + 1, 2**40, 2**64 - 1]).to_bytes(8, "little") + data[8:])
        return f"{path.name}: header length"
    elif kind == 6:  # truncation
        path.write_bytes(data[:rng.randrange(len(data))])
        return f"{path.name}: truncated"
    else:  # a value in the data
        buf = bytearray(data)
        start = 8 + n + rng.randrange(max(1, len(data) - 8 - n))
        buf[start:start + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff"])
        path.write_bytes(bytes(buf))
        return f"{path.name}: data bytes"
    write_header(path, data, n, header)
    return f"{path.name}: {key} kind {kind}"


def corrupt_json(path, keys):
    document = json.loads(path.read_text())
    key = rng.choice([k for k in keys if k in document] or list(document))
    document[key] = rng.choice(HOSTILE)
    path.write_text(json.dumps(document))
    return f"{path.name}: {key} = {document[key]!r}"


CONFIG_KEYS = ["num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size",
               "vocab_size", "layer_types", "norm_topk_prob", "architectures", "model_type", "moei2",
               "num_attention_heads", "tie_word_embeddings", "max_position_embeddings"]


def corrupt(directory: Path, meta_keys):
    shards = sorted(directory.glob("*.safetensors"))
    target = rng.randrange(4)
    if target <= 1:
        return corrupt_shard(rng.choice(shards))
    if target == 2:
        return corrupt_json(directory / "config.json", CONFIG_KEYS)
    index = next(iter(directory.glob("*.index.json")))
    if meta_keys and rng.random() < 0.6:
        return corrupt_json(directory / "moei2.json", meta_keys)
    document = json.loads(index.read_text())
    key = rng.choice(list(document["weight_map"]))
    document["weight_map"][key] = rng.choice(["../config.json", "missing.safetensors", shards[0].name, 3])
    index.write_text(json.dumps(document))
    return f"{index.name}: {key}"


def check_load(path, original):
    model = moei2.load(path)
    state = model.state_dict()
    assert set(state) == set(original), "load returned another set of tensors"
    for k, v in original.items():
        assert torch.equal(state[k], v), f"load returned other values for {k}"


def check_stream(path, shapes):
    src = StreamedSource.open(path)
    for i in range(src.adapter.num_hidden_layers):
        with src.layer(i) as layer:
            for name, t in layer.state_dict().items():
                key = f"model.layers.{i}.{name}"
                assert t.is_floating_point() and bool(torch.isfinite(t).all()), f"{key} is not finite floats"
                assert key not in shapes or tuple(t.shape) == shapes[key], f"{key} has another shape"


def main():
    root = Path(tempfile.mkdtemp(prefix="moei2-fuzz-"))
    try:
        model = build_model("qwen2_moe", layers=2)
        moei2.save(model, root / "moei2", max_shard_bytes=20000)
        original = {k: v.clone() for k, v in moei2.load(root / "moei2").state_dict().items()}
        model.save_pretrained(str(root / "hf"), max_shard_size="20KB")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        meta_keys = list(json.loads((root / "moei2" / "moei2.json").read_text()))
        for case in range(CASES):
            kind = "moei2" if case % 2 == 0 else "hf"
            work = root / f"case{case}"
            shutil.copytree(root / kind, work)
            what = corrupt(work, meta_keys if kind == "moei2" else None)
            print(f"case {case} {kind} {what}", file=sys.stderr, flush=True)
            try:
                if kind == "moei2":
                    check_load(work, original)
                else:
                    check_stream(work, shapes)
            except ALLOWED:
                pass
            shutil.rmtree(work)
        print(f"ok {CASES}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
