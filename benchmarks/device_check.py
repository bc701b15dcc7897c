"""The device check: what benchmarks/device_check.sh measures once the extension is built.

Steps, each timed, all results in one JSON file plus one markdown row:

``same_choices``  a narrow synthetic Qwen2-MoE checkpoint (benchmarks/scale.py's writer, narrow
                  widths) compressed streamed on the device and on the CPU (C kernels): the same
                  experts dropped, the same ranks, importance to 1e-3 relative;
``scale``         a 4-layer checkpoint of Qwen1.5-MoE-A2.7B widths compressed streamed on the device
                  at ``--tokens`` calibration tokens, in a fresh process: per-MoE-layer stage times,
                  peak device memory, peak RSS;
``projection``    the full 24-layer model at 262,144 tokens from the measured per-layer, per-token
                  cost of each stage. Every stage is taken as proportional to the tokens, which
                  bounds the eigen-solves of the decomposition (independent of the tokens) from above.

``--dry-run`` runs every step on the CPU with the torch kernels (the device path) and tiny sizes,
so the script is known to work before it meets a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402

FULL_LAYERS = 24
FULL_TOKENS = 128 * 2048

# Widths of the narrow checkpoints (Qwen2-MoE layout, a few MB): the same-choices step, and the
# dry run's stand-in for the Qwen-width one.
NARROW = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 48,
          "shared_expert_intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
          "num_experts": 16, "num_experts_per_tok": 4,
          # the bundled tokenizer's vocabulary, and special tokens inside it
          "vocab_size": 4096, "bos_token_id": 1, "eos_token_id": 2}


def _config(args, device: str, **extra):
    import moei2

    sequences = max(1, args.tokens // args.seq_len)
    kt = {"kt_candidates": 2, "kt_block": 2} if args.dry_run else {}
    return moei2.CompressionConfig(num_sequences=sequences, seq_len=args.seq_len, calib_batch_size=args.batch,
                                   device=device, dtype=args.dtype, population=args.population,
                                   generations=args.generations, **kt, **extra)


def _tokenizer():
    import moei2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(moei2.demo_model_path()))


def step_same_choices(args, work: Path) -> dict:
    """The narrow checkpoint streamed on the device (torch kernels) and on the CPU (C kernels)."""
    import numpy as np

    import moei2

    directory = work / "narrow"
    scale.write_checkpoint(directory, "qwen2_moe", 3, overrides=NARROW)
    runs = {}
    for name, device, kernels in (("device", args.device, "torch"), ("cpu", "cpu", "c")):
        config = dataclasses.replace(_config(args, device, kernels=kernels), num_sequences=4 if args.dry_run else 8,
                                     seq_len=32 if args.dry_run else 64, calib_batch_size=4, dtype="float32")
        started = time.perf_counter()
        _, report = moei2.compress(directory, _tokenizer(), moei2.demo_texts("calibration"), config,
                                   output=work / f"narrow-{name}", overwrite=True, progress=False)
        runs[name] = (report, time.perf_counter() - started)
    device, cpu = runs["device"][0], runs["cpu"][0]
    same_dropped = all(device["layers"][l]["dropped"] == cpu["layers"][l]["dropped"] for l in cpu["layers"])
    same_ranks = all(device["layers"][l]["lowrank"]["ranks"] == cpu["layers"][l]["lowrank"]["ranks"]
                     for l in cpu["layers"])
    importance = max(float(np.max(np.abs(np.subtract(device["layers"][l]["importance"], cpu["layers"][l]["importance"]))
                                  / np.maximum(np.abs(cpu["layers"][l]["importance"]), 1e-30)))
                     for l in cpu["layers"])
    return {"same_dropped": same_dropped, "same_ranks": same_ranks, "importance_max_rel_diff": importance,
            "ok": bool(same_dropped and same_ranks and importance < 1e-3),
            "seconds": {k: round(v[1], 2) for k, v in runs.items()}}


# Run in a fresh process, so that peak RSS and peak device memory are this compression's alone.
_SCALE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import torch
import moei2
from moei2.stages import common
spec = json.loads(sys.argv[1])
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(str(moei2.demo_model_path()))
config = moei2.CompressionConfig.from_dict(spec["config"])
cuda = torch.device(config.device).type == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
_, report = moei2.compress(spec["dir"], tokenizer, moei2.demo_texts("calibration"), config, output=spec["out"],
                           overwrite=True, progress=spec["progress"])
print(json.dumps({"seconds": time.perf_counter() - started, "times": report["times"],
                  "tokens": report["calibration"]["tokens"],
                  "moe_layers": len(report["layers"]),
                  "experts_kept": {l: len(v["kept"]) for l, v in report["layers"].items()},
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_device_memory": torch.cuda.max_memory_allocated() if cuda else None}))
"""


def step_scale(args, work: Path) -> dict:
    directory = work / "qwen-width"
    overrides = NARROW if args.dry_run else None
    started = time.perf_counter()
    scale.write_checkpoint(directory, "qwen2_moe", args.layers, overrides=overrides)
    written = time.perf_counter() - started
    config = _config(args, args.device)
    spec = {"dir": str(directory), "out": str(work / "qwen-width-out"), "config": config.to_dict(),
            "progress": not args.quiet}
    proc = subprocess.run([sys.executable, "-c", _SCALE, json.dumps(spec), str(ROOT)], stdout=subprocess.PIPE,
                          text=True, check=False, timeout=args.scale_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the {args.layers}-layer compression failed (exit {proc.returncode}); its error is above")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    moe_layers = row["moe_layers"]
    row["write_seconds"] = round(written, 2)
    row["per_layer_seconds"] = {k: round(v / moe_layers, 3) for k, v in row["times"].items()}
    stages = {k: v for k, v in row["times"].items() if k not in ("total", "calibration_data")}
    # Time outside the timed stages (embedding, writing the shards): charged per token as well.
    stages["other"] = max(0.0, row["times"]["total"] - row["times"].get("calibration_data", 0.0) - sum(stages.values()))
    row["per_layer_per_token_seconds"] = {k: v / moe_layers / row["tokens"] for k, v in stages.items()}
    row["widths"] = "narrow (dry run)" if args.dry_run else "Qwen1.5-MoE-A2.7B"
    return row


def projection(measured: dict) -> dict:
    """The full-depth model at the paper's calibration from per-layer, per-token stage costs."""
    per_token = measured["per_layer_per_token_seconds"]
    stages = {k: v * FULL_LAYERS * FULL_TOKENS for k, v in per_token.items()}
    total = sum(stages.values())
    return {"layers": FULL_LAYERS, "tokens": FULL_TOKENS, "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
            "total_seconds": round(total, 1), "total_minutes": round(total / 60, 2),
            "rule": "each stage's measured seconds per MoE layer per calibration token x 24 layers x 262,144 tokens "
                    "(an upper bound for the decomposition's eigen-solves, which do not grow with the tokens)"}


def machine(device: str) -> dict:
    import torch

    out = {"torch": torch.__version__, "cpus": os.cpu_count(), "device": device}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
        out["cuda"] = torch.version.cuda
    return out


def markdown_row(result: dict) -> str:
    s, p = result["scale"], result["projection"]
    per = s["per_layer_seconds"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if k not in ("total", "calibration_data"))
    memory = "-" if s["peak_device_memory"] is None else f"{s['peak_device_memory'] / 2**30:.2f}"
    return (f"| {result['machine'].get('gpu', result['machine']['device'])} | {s['widths']} | {result['layers']} | "
            f"{s['tokens']} | {per['total']:.2f} | {stages} | {memory} | {s['peak_rss'] / 2**30:.2f} | "
            f"{'yes' if result['same_choices']['ok'] else 'NO'} | {p['total_minutes']:.1f} |")


MARKDOWN_HEADER = ("| device | widths | layers | tokens | s/layer | stage s/layer | peak device GiB | peak RSS GiB | "
                   "same choices as CPU | projected 24 layers x 262,144 tokens (min) |\n"
                   "|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32768, help="calibration tokens of the scale step")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="calibration sequences per forward pass")
    ap.add_argument("--population", type=int, default=100)
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--scale-timeout", type=int, default=300, help="seconds the scale step may take")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, narrow widths, torch kernels on the CPU")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, required=True, help="append the result's row here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.dtype, args.layers = "cpu", "float32", 2
        args.tokens, args.seq_len, args.batch = 128, 32, 2
        args.population, args.generations = 8, 2
    from moei2.source import check_device

    check_device(args.device, args.dtype)
    work = args.work or Path(tempfile.mkdtemp(prefix="moei2-device-check-"))
    gpu_tests = os.environ.get("MOEI2_GPU_TESTS_RC")
    result = {"layers": args.layers, "dry_run": args.dry_run, "machine": machine(args.device),
              "gpu_tests_exit_status": None if gpu_tests is None else int(gpu_tests),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    result["same_choices"] = step_same_choices(args, work)
    print(f"same choices on {args.device} and cpu: {result['same_choices']}", flush=True)
    result["scale"] = step_scale(args, work)
    result["projection"] = projection(result["scale"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    row = markdown_row(result)
    new = not args.markdown.exists()
    with open(args.markdown, "a") as f:
        if new:
            f.write(MARKDOWN_HEADER + "\n")
        f.write(row + "\n")
    print(row)
    print(f"projected full model: {result['projection']['total_minutes']:.1f} min; wrote {args.json}")
    return 0 if result["same_choices"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
