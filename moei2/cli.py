"""The moei2 command line: compress | evaluate | inspect | report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _load_model(spec: str, dtype: str | None = None):
    """'demo' for the bundled model, a moei2 checkpoint, or a Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    if spec == "demo":
        from .demo import demo_model

        return demo_model(dtype=torch_dtype or torch.float32)
    path = Path(spec)
    if not path.is_dir():
        raise CLIError(f"--model: {spec!r} is neither 'demo' nor a directory")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    from .io import is_moei2_checkpoint, load

    if is_moei2_checkpoint(path):
        return load(path, dtype=torch_dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    return model, tokenizer


def _read_texts(paths: list[str] | None):
    if not paths:
        from .demo import demo_texts

        return demo_texts("calibration")
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CLIError(f"--calibration: {p!r} is not a file")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def cmd_compress(args) -> int:
    from .config import CompressionConfig, LoRAConfig
    from .io import save
    from .pipeline import compress

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--output: {out} exists and is not empty (use --overwrite)")
    try:
        config = CompressionConfig(
            num_sequences=args.num_sequences, seq_len=args.seq_len, calib_batch_size=args.batch_size,
            seed=args.seed, prune_ratio=args.prune_ratio, prune_rule=args.prune_rule,
            population=args.population, generations=args.generations, kt_candidates=args.kt_candidates,
            kt_block=args.kt_block, rank_keep_ratio=None if args.no_decompose else args.rank_keep_ratio,
            lora=LoRAConfig(steps=args.lora_steps) if args.lora else None,
        )
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc
    texts = _read_texts(args.calibration)  # user input is checked before the slow model load
    model, tokenizer = _load_model(args.model)
    model, report = compress(model, tokenizer, texts, config, work_dir=args.work_dir, progress=not args.quiet)
    save_report = save(model, out, tokenizer=tokenizer, report=report, overwrite=args.overwrite)
    report["checkpoint"] = save_report
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        Path(args.report).write_text(text)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    lines = ["moei2 compression report", f"  seed: {report['seed']}"]
    for l, info in report["layers"].items():
        kept = info.get("kept", [])
        ranks = info.get("lowrank", {}).get("ranks")
        rank_text = f" ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})" if ranks else ""
        lines.append(f"  layer {l:>3}: kept {len(kept):>3} experts{rank_text}")
    p = report["parameters"]
    lines.append(f"  routed expert parameters: {p['routed_expert_before']:,} -> {p['routed_expert_after']:,} "
                 f"({100 * p['routed_expert_reduction']:.1f}% removed)")
    lines.append(f"  model parameters: {p['model_before']:,} -> {p['model_after']:,} "
                 f"({100 * p['model_reduction']:.1f}% removed), {p['model_gib_before']:.4f} GiB -> "
                 f"{p['model_gib_after']:.4f} GiB")
    times = report.get("times", {})
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from . import evaluate as ev

    model, tokenizer = _load_model(args.model)
    result = {}
    if args.tasks:
        result["zero_shot"] = ev.zero_shot(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.batch_size)
    if not args.no_perplexity:
        from .demo import demo_texts

        texts = demo_texts("heldout") if args.text is None else [Path(args.text).read_text()]
        result["perplexity"] = ev.perplexity(model, tokenizer, texts)
    if args.throughput:
        result["throughput"] = ev.throughput(model, tokenizer)
    text = json.dumps(result, indent=2, default=str)
    if args.report:
        Path(args.report).write_text(text)
    print(text)
    return 0


def cmd_inspect(args) -> int:
    from .io import inspect_checkpoint

    print(json.dumps(inspect_checkpoint(args.checkpoint), indent=2, default=str))
    return 0


def cmd_report(args) -> int:
    from .plot import render_report

    paths = render_report(args.checkpoint, args.output)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moei2", description="Compress MoE language models with MoE-I2.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save a moei2 checkpoint")
    c.add_argument("--model", default="demo", help="'demo' (bundled model) or a model directory")
    c.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    c.add_argument("--calibration", nargs="*", help="text files for calibration (default: bundled text)")
    c.add_argument("--num-sequences", type=int, default=64)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--prune-ratio", type=float, default=0.25)
    c.add_argument("--prune-rule", default="inverse", choices=["inverse", "uniform"])
    c.add_argument("--population", type=int, default=100)
    c.add_argument("--generations", type=int, default=50)
    c.add_argument("--kt-candidates", type=int, default=3)
    c.add_argument("--kt-block", type=int, default=3)
    c.add_argument("--rank-keep-ratio", type=float, default=2.0 / 3.0)
    c.add_argument("--no-decompose", action="store_true", help="prune only")
    c.add_argument("--lora", action="store_true", help="LoRA recovery after compression (needs peft)")
    c.add_argument("--lora-steps", type=int, default=100)
    c.add_argument("--work-dir", help="directory for resumable progress")
    c.add_argument("--report", help="write the JSON report here too")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("evaluate", help="zero-shot accuracy, perplexity, throughput")
    e.add_argument("model", help="'demo', a moei2 checkpoint or a model directory")
    e.add_argument("--tasks", default="local", help="comma-separated lm-eval tasks, or 'local'")
    e.add_argument("--limit", type=int)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--text", help="held-out text file for perplexity (default: bundled)")
    e.add_argument("--no-perplexity", action="store_true")
    e.add_argument("--throughput", action="store_true")
    e.add_argument("--report", help="write the JSON result here")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("inspect", help="describe a moei2 checkpoint")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("report", help="render a checkpoint's compression report as PNG figures")
    r.add_argument("checkpoint")
    r.add_argument("--output", "-o", help="directory for the figures (default: CHECKPOINT/figures)")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"moei2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"moei2 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
