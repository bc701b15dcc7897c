"""Real-size widths, any depth: synthetic checkpoints and what streaming them costs.

Writes a Hugging Face checkpoint directory with random weights in bfloat16, sharded, in the layout
the real checkpoints have (one tensor per routed expert: ``mlp.experts.{j}.gate_proj.weight`` ...,
Mixtral's ``block_sparse_moe.experts.{j}.w1/w2/w3``), and a ``config.json`` of the real model with
``num_hidden_layers`` overridden, for

* ``qwen2_moe``   Qwen1.5-MoE-A2.7B: hidden 2048, 60 experts of width 1408, top-4, shared expert 5632,
                  16 heads, vocab 151936 (24 layers, 28.6 GB);
* ``deepseek_v2`` DeepSeek-V2-Lite: hidden 2048, 64 routed experts of width 1408 and 2 shared, top-6,
                  first layer dense (10944), MLA attention (kv_lora_rank 512, no q_lora, rope 64,
                  nope 128, v 128), 16 heads, vocab 102400 (27 layers, 31 GB);
* ``mixtral``     Mixtral-8x7B: hidden 4096, 8 experts of width 14336, top-2, 32 heads, 8 KV heads,
                  vocab 32000 (32 layers, 93 GB).

Weights come from NumPy's default_rng (float32, then bfloat16) and are written shard by shard in
chunks of rows: the model is never in memory, only one chunk of one tensor.

Steps (each a function taking and returning the run's result dict, so later steps slot in):

``write``         the checkpoint (skipped when ``--dir`` already holds one of the same spec);
``measure_load``  ``--measure-load``: in a fresh process per step, opens the directory with
                  :class:`moei2.streaming.StreamedSource` and materialises the outer tensors and
                  then each layer in turn, recording peak RSS (``resource.getrusage``), the RSS
                  left after the scope, and the time, against the checkpoint's size; plus one
                  process walking all layers one after the other;
``compress``      ``--compress``: in a fresh process, ``moei2.compress(directory, ..., output=...)``
                  streamed (one KT block resident), calibrated on the bundled text with the bundled
                  tokenizer (``--sequences`` x ``--seq-len`` tokens), recording each stage's time per MoE
                  layer and the peak RSS against the checkpoint's size; with ``--table`` also a
                  markdown row;
``compress_budget`` ``--budget B``: the same, in budget mode at B (after the default mode's run, in
                  another fresh process), and the ratio of the two runs' times and peak RSS.

Example (2 layers of Qwen widths, about 3.5 GB on disk)::

    python benchmarks/scale.py --family qwen2_moe --layers 2 --dir /tmp/qwen2 --measure-load \\
        --json benchmarks/results/scale_load_qwen2_moe_2.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout
    sys.path.insert(0, str(ROOT))

REAL_CONFIGS = {
    "qwen2_moe": {  # Qwen/Qwen1.5-MoE-A2.7B
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    "deepseek_v2": {  # deepseek-ai/DeepSeek-V2-Lite
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "aux_loss_alpha": 0.001,
        "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    },
    "mixtral": {  # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    },
}

SHARD_BYTES = 2 << 30
CHUNK_ELEMENTS = 16 << 20  # float32 elements generated at once (64 MB)
SPEC_FILE = "scale_spec.json"


# ---- the checkpoint ---------------------------------------------------------------------------

def config_for(family: str, layers: int, overrides: Optional[dict] = None) -> dict:
    """The real model's config.json with ``layers`` layers (and ``overrides``: narrow widths for
    checks that only need the layout)."""
    if family not in REAL_CONFIGS:
        raise SystemExit(f"family must be one of {', '.join(REAL_CONFIGS)}, got {family!r}")
    if layers < 1:
        raise SystemExit(f"layers must be >= 1, got {layers}")
    return dict(REAL_CONFIGS[family], num_hidden_layers=layers, **(overrides or {}))


def checkpoint_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``[(checkpoint key, shape)]`` in state-dict order, experts split per expert as the real
    checkpoints store them; shapes come from the transformers model built on the meta device."""
    import torch
    import transformers

    from moei2.models import ADAPTERS

    cls = ADAPTERS[config["architectures"][0]].model_class()
    cfg = cls.config_class(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = cls(cfg)
    del transformers
    out = []
    mixtral = config["model_type"] == "mixtral"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}
    for key, value in model.state_dict().items():
        if key.startswith("model.rotary_emb."):
            continue
        shape = tuple(value.shape)
        prefix, _, param = key.rpartition(".")
        if mixtral:
            prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
        if prefix.endswith(".experts") and param in ("gate_up_proj", "down_proj"):
            num_experts, rows, cols = shape
            for j in range(num_experts):
                if param == "gate_up_proj":
                    for part in ("gate_proj", "up_proj"):
                        out.append((f"{prefix}.{j}.{names.get(part, part)}.weight", (rows // 2, cols)))
                else:
                    out.append((f"{prefix}.{j}.{names.get('down_proj', 'down_proj')}.weight", (rows, cols)))
            continue
        if mixtral:
            key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        out.append((key, shape))
    return out


def _fill(f, key: str, shape: tuple, rng) -> None:
    """Writes one bf16 tensor, generated in chunks: norms are ones, everything else uniform with the
    standard deviation of a fan-in initialisation."""
    import torch

    numel = int(np.prod(shape))
    is_norm = key.endswith("norm.weight")
    scale = np.float32(np.sqrt(3.0 / shape[-1])) if len(shape) > 1 else np.float32(0.02)
    done = 0
    while done < numel:
        n = min(CHUNK_ELEMENTS, numel - done)
        if is_norm:
            chunk = np.ones(n, dtype=np.float32)
        else:
            chunk = rng.random(n, dtype=np.float32)
            chunk *= 2 * scale
            chunk -= scale
        f.write(torch.from_numpy(chunk).to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        done += n


def write_checkpoint(directory: Path, family: str, layers: int, *, seed: int = 0,
                     shard_bytes: int = SHARD_BYTES, overrides: Optional[dict] = None) -> dict:
    """Writes the synthetic checkpoint; returns ``{"bytes", "files", "tensors", "seconds"}``."""
    start = time.perf_counter()
    config = config_for(family, layers, overrides)
    tensors = checkpoint_tensors(config)
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key, shape in shard:
            nbytes = int(np.prod(shape)) * 2
            header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / (name + ".part"), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key, shape in shard:
                _fill(f, key, shape, rng)
        os.replace(directory / (name + ".part"), directory / name)
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    files = sorted(set(weight_map.values()))
    spec = {"family": family, "layers": layers, "seed": seed, "shard_bytes": shard_bytes}
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    return {"bytes": sum((directory / f).stat().st_size for f in files), "files": len(files),
            "tensors": len(tensors), "seconds": round(time.perf_counter() - start, 2)}


# ---- steps ----------------------------------------------------------------------------------------

def step_write(args, result: dict) -> dict:
    spec_file = args.dir / SPEC_FILE
    spec = {"family": args.family, "layers": args.layers, "seed": args.seed, "shard_bytes": args.shard_bytes}
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        files = sorted(args.dir.glob("model-*.safetensors"))
        result["write"] = {"reused": True, "bytes": sum(f.stat().st_size for f in files), "files": len(files)}
    else:
        result["write"] = write_checkpoint(args.dir, args.family, args.layers, seed=args.seed,
                                           shard_bytes=args.shard_bytes)
    result["checkpoint_bytes"] = result["write"]["bytes"]
    return result


_PROBE = r"""
import json, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
directory, what = sys.argv[1], sys.argv[2]
import torch
from moei2.streaming import StreamedSource
base = peak()
t0 = time.perf_counter()
src = StreamedSource.open(directory)
out = {"what": what, "rss_after_imports": base, "open_seconds": round(time.perf_counter() - t0, 3)}
t0 = time.perf_counter()
if what == "outer":
    with src.outer():
        out["rss_in_scope"] = rss()
elif what == "all":
    with src.outer():
        pass
    for i in range(src.adapter.num_hidden_layers):
        with src.layer(i):
            pass
elif what != "open":
    with src.layer(int(what)) as layer:
        out["rss_in_scope"] = rss()
        out["layer_bytes"] = sum(p.numel() * p.element_size() for p in layer.parameters())
out["seconds"] = round(time.perf_counter() - t0, 3)
out["rss_after_scope"] = rss()
out["peak_rss"] = peak()
print(json.dumps(out))
"""


def step_measure_load(args, result: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    whats = ["open", "outer"] + [str(i) for i in range(args.layers)] + ["all"]
    rows = []
    for what in whats:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(args.dir), what], env=env, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"measure-load step {what!r} failed:\n{proc.stderr[-4000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["peak_rss_over_checkpoint"] = round(row["peak_rss"] / result["checkpoint_bytes"], 4)
        rows.append(row)
        print(f"  {what:>6}: peak RSS {row['peak_rss'] / 2**30:6.2f} GiB "
              f"({row['peak_rss_over_checkpoint']:.3f} x checkpoint), after scope "
              f"{row['rss_after_scope'] / 2**30:6.2f} GiB, {row['seconds']:.2f} s", flush=True)
    result["measure_load"] = rows
    return result


_COMPRESS = r"""
import json, resource, sys, threading, time
args = json.loads(sys.argv[1])
import moei2
from moei2.stages import common

# Peak RSS per stage: a sampler thread reads the resident set every 50 ms and charges it to the
# stage the pipeline's timer is in (the innermost one); "other" is time outside every stage.
stages, by_stage = [], {}
timed = common.Timer.__call__


def traced(self, name):
    import contextlib

    @contextlib.contextmanager
    def scope():
        stages.append(name)
        try:
            with timed(self, name):
                yield
        finally:
            stages.pop()
    return scope()


def sample():
    page = resource.getpagesize()
    while True:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * page
        key = stages[-1] if stages else "other"
        by_stage[key] = max(by_stage.get(key, 0), now)
        time.sleep(0.05)


common.Timer.__call__ = traced
threading.Thread(target=sample, daemon=True).start()
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(str(moei2.demo_model_path()))
budget = {"budget": args["budget"]} if args["budget"] is not None else {}
config = moei2.CompressionConfig(num_sequences=args["sequences"], seq_len=args["seq_len"],
                                 calib_batch_size=args["batch"], device=args["device"], dtype=args["dtype"],
                                 **budget)
started = time.perf_counter()
_, report = moei2.compress(args["dir"], tokenizer, moei2.demo_texts("calibration"), config, output=args["out"],
                           overwrite=True, progress=False)
usage = resource.getrusage(resource.RUSAGE_SELF)
out = {"seconds": round(time.perf_counter() - started, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
       "times": report["times"],
       "parameters": report["parameters"], "calibration_tokens": report["calibration"]["tokens"],
       "experts_kept": {l: len(v["kept"]) for l, v in report["layers"].items()},
       "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "peak_rss_by_stage": dict(sorted(by_stage.items()))}
print(json.dumps(out))
"""


def step_compress(args, result: dict, budget: Optional[float] = None, key: str = "compress") -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out_dir = args.output or args.dir.with_name(args.dir.name + "-compressed")
    spec = {"dir": str(args.dir), "out": str(out_dir), "sequences": args.sequences, "seq_len": args.seq_len,
            "batch": args.batch, "device": args.device, "dtype": args.dtype, "budget": budget}
    proc = subprocess.run([sys.executable, "-c", _COMPRESS, json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"compress failed:\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    files = list(out_dir.glob("*.safetensors"))
    row["output_bytes"] = sum(f.stat().st_size for f in files)
    row["peak_rss_over_checkpoint"] = round(row["peak_rss"] / result["checkpoint_bytes"], 4)
    # Per MoE layer: DeepSeek-V2-Lite's first layer is dense and costs next to nothing.
    moe_layers = len(row["experts_kept"]) or args.layers
    row["per_layer_seconds"] = {k: round(v / moe_layers, 2) for k, v in row["times"].items()}
    result[key] = row
    if args.delete:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"  compress: {row['seconds']:.0f} s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
          f"({row['peak_rss_over_checkpoint']:.3f} x checkpoint of {result['checkpoint_bytes'] / 1e9:.1f} GB)",
          flush=True)
    print("  peak RSS by stage (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in row["peak_rss_by_stage"].items()),
          flush=True)
    return result


def markdown_row(result: dict) -> str:
    """One row of benchmarks/results/scale.md: family, layers, sizes, peak RSS, per-layer stage times."""
    c = result["compress"]
    per = c["per_layer_seconds"]
    stages = ", ".join(f"{k} {v:.0f}" for k, v in per.items() if k not in ("total", "calibration_data"))
    return (f"| {result['family']} | {result['layers']} | {result['checkpoint_bytes'] / 1e9:.2f} | "
            f"{c['output_bytes'] / 1e9:.2f} | {c['peak_rss'] / 2**30:.2f} | {c['peak_rss_over_checkpoint']:.2f} | "
            f"{c['calibration_tokens']} | {per['total']:.0f} | {stages} | {c['seconds'] / 60:.1f} |")


def step_compress_budget(args, result: dict) -> dict:
    """Budget mode on the same checkpoint, right after the default mode's run of ``compress``: the
    cost of choosing the mix, as a ratio of the two runs' times (each in its own fresh process)."""
    if "compress" not in result:
        result = step_compress(args, result)
    result = step_compress(args, result, budget=args.budget, key="compress_budget")
    default, chosen = result["compress"], result["compress_budget"]
    result["budget_over_default"] = {
        "budget": args.budget,
        "seconds": round(chosen["seconds"] / default["seconds"], 3),
        # CPU time is the steadier ratio on a machine shared with other jobs.
        "cpu_seconds": round(chosen["cpu_seconds"] / default["cpu_seconds"], 3),
        "per_stage_seconds": {k: chosen["per_layer_seconds"][k] for k in chosen["per_layer_seconds"]},
        "default_reduction": default["parameters"]["routed_expert_reduction"],
        "budget_reduction": chosen["parameters"]["routed_expert_reduction"],
        "peak_rss": round(chosen["peak_rss"] / default["peak_rss"], 3)}
    print(f"  budget mode {args.budget}: {chosen['seconds']:.0f} s against {default['seconds']:.0f} s by default "
          f"({result['budget_over_default']['seconds']:.2f} x; CPU time "
          f"{result['budget_over_default']['cpu_seconds']:.2f} x)", flush=True)
    return result


STEPS = {"write": step_write, "measure_load": step_measure_load, "compress": step_compress,
         "compress_budget": step_compress_budget}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(REAL_CONFIGS), default="qwen2_moe")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", type=Path, required=True, help="checkpoint directory to write (or reuse)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=SHARD_BYTES)
    ap.add_argument("--measure-load", action="store_true", help="measure streamed loading per layer")
    ap.add_argument("--compress", action="store_true", help="compress the checkpoint streamed, in a fresh process")
    ap.add_argument("--output", type=Path, help="where --compress writes (default: DIR-compressed)")
    ap.add_argument("--sequences", type=int, default=8, help="calibration sequences for --compress")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration sequence length for --compress")
    ap.add_argument("--batch", type=int, default=4, help="calibration sequences per forward for --compress")
    ap.add_argument("--budget", type=float, default=None,
                    help="after --compress (default mode), also compress in budget mode at this share of "
                         "routed-expert parameters removed and report the time ratio")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--table", type=Path, help="append a markdown row of the compress step to this file")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--delete", action="store_true", help="remove the checkpoint directory at the end")
    args = ap.parse_args(argv)
    config_for(args.family, args.layers)
    steps = (["write"] + (["measure_load"] if args.measure_load else []) + (["compress"] if args.compress else [])
             + (["compress_budget"] if args.budget is not None else []))
    result = {"family": args.family, "layers": args.layers, "machine": {"cpus": os.cpu_count()}}
    try:
        for name in steps:
            result = STEPS[name](args, result)
    finally:
        if args.delete:
            import shutil

            shutil.rmtree(args.dir, ignore_errors=True)
    result["peak_rss_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.table and "compress" in result:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        if not args.table.exists():
            args.table.write_text("| model widths | layers | checkpoint GB | output GB | peak RSS GiB | peak / checkpoint "
                                  "| calibration tokens | s per MoE layer | stage s per MoE layer | total min |\n"
                                  "|---|---|---|---|---|---|---|---|---|---|\n")
        with args.table.open("a") as fh:
            fh.write(markdown_row(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "measure_load"}, indent=2))
    return result


if __name__ == "__main__":
    main()
