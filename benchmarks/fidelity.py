"""Fidelity of MoE-I2 against baselines at equal budget, on a bundled demo model.

Rows: the original model, MoE-I2, and baselines at the same budget:
  budget "25% experts pruned" (pruning only): genetic search + KT (MoE-I2 stage 1), greedy search,
      routing-frequency pruning, random pruning;
  budget "~50% expert parameters removed": full MoE-I2 (25% pruned + importance-allocated
      whitened low-rank keeping 2/3), uniform-rank plain SVD and uniform-rank whitened SVD of all
      experts keeping 1/2;
  at 25%, 50% and 70% of the expert parameters also budget mode (moei2 chooses the mix) and the
      hand mixes prune_ratio 1/16, 1/8, 1/4 with the rest removed by uniform whitened ranks.
Columns: held-out perplexity with its standard error (windows as the sampled units), zero-shot
accuracy on the local multiple-choice tasks with the standard error of the average, routed-expert
parameters removed, compression time. Below the table, budget mode against the best other row at
the same share removed, as a paired difference of log-perplexities over the same windows.

    python benchmarks/fidelity.py [--quick] [--out benchmarks/results] [--model demo|demo-fine]
        [--search-hidden compressed|original] [--rows SUBSTRING,...] [--seed N] [--threads N]

--model picks the bundled model: demo (the Qwen2-MoE, the default) or demo-fine (64 experts).

--search-hidden picks which hidden state the search and the KT step see (docs/method.md); the
default is the method's. --rows keeps only the rows whose method name contains one of the
substrings (the original model's row is always kept). --perplexity-only skips the zero-shot tasks.
--name NAME writes NAME.json / NAME.md instead of fidelity.json / fidelity.md. --render rewrites the
markdown and the figure from an existing NAME.json without running anything.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rows(quick: bool):
    stage1 = dict(rank_keep_ratio=None)
    return [
        ("original", None, None),
        ("MoE-I2 pruning (genetic + KT)", "25% experts pruned", dict(stage1, selection="genetic")),
        ("greedy search pruning", "25% experts pruned", dict(stage1, selection="greedy")),
        ("routing-frequency pruning", "25% experts pruned", dict(stage1, selection="frequency")),
        ("REAP pruning", "25% experts pruned", dict(stage1, selection="reap")),
        ("random pruning", "25% experts pruned", dict(stage1, selection="random")),
        ("MoE-I2 (prune 25% + whitened low-rank 2/3)", "~50% expert params", dict(selection="genetic")),
        ("uniform-rank plain SVD (keep 1/2)", "~50% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.5, rank_rule="uniform", whiten=False)),
        ("uniform-rank whitened SVD (keep 1/2)", "~50% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.5, rank_rule="uniform", whiten=True)),
        # More levels for the trade-off curve: MoE-I2 removes 1 - 0.75 * keep, the SVD rows match it.
        ("uniform-rank plain SVD (keep 3/4)", "25% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.75, rank_rule="uniform", whiten=False)),
        ("uniform-rank whitened SVD (keep 3/4)", "25% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.75, rank_rule="uniform", whiten=True)),
        ("MoE-I2 (prune 25% + whitened low-rank 0.4)", "70% expert params",
         dict(selection="genetic", rank_keep_ratio=0.4)),
        ("uniform-rank plain SVD (keep 0.3)", "70% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.3, rank_rule="uniform", whiten=False)),
        ("uniform-rank whitened SVD (keep 0.3)", "70% expert params",
         dict(prune_ratio=0.0, rank_keep_ratio=0.3, rank_rule="uniform", whiten=True)),
        *budget_rows(0.25, "25% expert params"),
        *budget_rows(0.5, "~50% expert params"),
        *budget_rows(0.7, "70% expert params"),
    ]


def budget_rows(removed: float, label: str):
    """Budget mode at ``removed``, and the hand mixes it competes with: prune_ratio 1/16, 1/8, 1/4
    with the rest removed by uniform whitened ranks (prune_ratio 0 is the uniform whitened SVD row)."""
    mixes = []
    for p in ("1/16", "1/8", "1/4"):
        keep = (1 - removed) / (1 - float(Fraction(p)))
        # At 25 % removed, prune 1/4 leaves nothing to the ranks: that mix is the pruning row.
        if keep < 1 - 1e-9:
            mixes.append((f"hand mix (prune {p} + uniform whitened ranks) @{removed:g}", label,
                          dict(prune_ratio=float(Fraction(p)), rank_keep_ratio=keep, rank_rule="uniform",
                               whiten=True)))
    return [(f"budget mode @{removed:g}", label, dict(budget=removed)), *mixes]


def tradeoff_points(results):
    """Perplexity against expert parameters removed, one curve per method family."""
    points = []
    for r in results:
        name = r["method"]
        if name == "original":
            families = ["MoE-I2", "plain SVD", "whitened SVD", "budget mode"]
        elif name.startswith("MoE-I2"):
            families = ["MoE-I2"]
        elif name.startswith("budget mode"):
            families = ["budget mode"]
        elif "plain SVD" in name:
            families = ["plain SVD"]
        elif "whitened SVD" in name:
            families = ["whitened SVD"]
        else:
            continue
        points += [{"method": f, "removed": r["expert_params_removed"], "perplexity": r["perplexity"]}
                   for f in families]
    return points


def paired_log_ratio(a, b):
    """log(ppl_a / ppl_b) for two rows scored on the same windows, and its standard error with the
    windows as paired units (ratio estimator of the per-window NLL differences)."""
    import numpy as np

    tokens = np.asarray(a["window_tokens"], dtype=np.float64)
    diff = np.asarray(a["window_nll"]) - np.asarray(b["window_nll"])
    n, mean = len(diff), diff.sum() / tokens.sum()
    stderr = float(np.sqrt(n / (n - 1) * np.sum((diff - mean * tokens) ** 2)) / tokens.sum())
    return float(mean), stderr


def budget_comparisons(results):
    """For each share removed where budget mode ran: the best other row at the same share (within
    half a percent), and the paired difference of log-perplexities."""
    comparisons = []
    for r in results:
        if not r["method"].startswith("budget mode"):
            continue
        others = [o for o in results if o is not r and o["method"] != "original"
                  and abs(o["expert_params_removed"] - r["expert_params_removed"]) < 0.005]
        if not others:
            continue
        best = min(others, key=lambda o: o["perplexity"])
        delta, stderr = paired_log_ratio(r, best)
        comparisons.append({"removed": r["expert_params_removed"], "budget_ppl": r["perplexity"],
                            "best_other": best["method"], "best_other_ppl": best["perplexity"],
                            "delta_log_ppl": delta, "delta_stderr": stderr})
    return comparisons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calibration windows, shorter search and eval")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--search-hidden", choices=("compressed", "original"), default=None)
    parser.add_argument("--rows", default=None, help="comma-separated substrings of the method names to run")
    parser.add_argument("--perplexity-only", action="store_true", help="skip the zero-shot tasks")
    parser.add_argument("--name", default="fidelity", help="base name of the result files")
    parser.add_argument("--model", choices=("demo", "demo-fine"), default="demo", help="which bundled model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite NAME.md and the figure from an existing NAME.json")
    args = parser.parse_args(argv)
    if args.render:
        path = Path(args.out) / f"{args.name}.json"
        render(json.loads(path.read_text()), Path(args.out), args.name)
        return 0

    import torch

    import moei2
    from moei2 import CompressionConfig
    from moei2 import evaluate as ev
    from moei2.cli import BUNDLED_MODELS
    from moei2.pipeline import SEARCH_HIDDEN, compress_source
    from moei2.source import InMemorySource

    search_hidden = args.search_hidden or SEARCH_HIDDEN
    wanted = [w.strip() for w in args.rows.split(",")] if args.rows else None

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    demo_name = BUNDLED_MODELS[args.model]
    base_model, tokenizer = moei2.demo_model(name=demo_name)
    calibration = moei2.demo_texts("calibration")
    heldout = moei2.demo_texts("heldout")
    limit = 100 if args.quick else None
    common = dict(num_sequences=16 if args.quick else 64, seq_len=128 if args.quick else 256,
                  calib_batch_size=8, seed=args.seed,
                  population=40 if args.quick else 100, generations=20 if args.quick else 50)
    results = []
    for name, budget, overrides in rows(args.quick):
        if wanted and overrides is not None and not any(w in name for w in wanted):
            continue
        model = copy.deepcopy(base_model)
        started = time.perf_counter()
        removed = 0.0
        if overrides is not None:
            config = CompressionConfig(**{**common, **overrides}, search_hidden=search_hidden)
            report = compress_source(InMemorySource(model, device=config.device, dtype=config.dtype), tokenizer,
                                     calibration, config, progress=False)
            removed = report["parameters"]["routed_expert_reduction"]
        elapsed = time.perf_counter() - started
        scored = ev.perplexity(model, tokenizer, heldout, per_window=True)
        ppl = scored["perplexity"]
        zs = ({"average": float("nan"), "tasks": {}} if args.perplexity_only
              else ev.zero_shot(model, tokenizer, "local", limit=limit))
        errors = [t.get("acc_stderr") for t in zs["tasks"].values()]
        stderr = (sum(e * e for e in errors) ** 0.5 / len(errors)) if errors and None not in errors else float("nan")
        row = {"method": name, "budget": budget or "-", "perplexity": ppl,
               "perplexity_stderr": scored["perplexity_stderr"], "window_nll": scored["window_nll"],
               "window_tokens": scored["window_tokens"], "accuracy": zs["average"],
               "accuracy_stderr": stderr,
               "tasks": {k: v for k, v in zs["tasks"].items()}, "expert_params_removed": removed,
               "compress_seconds": elapsed if overrides is not None else 0.0}
        results.append(row)
        print(f"{name:48s} ppl {ppl:8.3f}  acc {zs['average']:.4f}  removed {100 * removed:5.1f}%  "
              f"{elapsed:6.1f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "fidelity", "bundled_model": args.model, "quick": args.quick, "seed": args.seed,
               "common_config": common, "search_hidden": search_hidden,
               "model": str(moei2.demo_model_path(demo_name)), "rows": results}
    render(payload, out, args.name, figure=not wanted)
    return 0


PRUNING_REFERENCE = "MoE-I2 pruning (genetic + KT)"


def render(payload: dict, out: Path, name: str, *, figure: bool = True) -> None:
    """Write NAME.json, NAME.md and (with every row run) NAME_tradeoff.png from a run's rows."""
    results = payload["rows"]
    payload["tradeoff"] = tradeoff_points(results)
    payload["budget_comparisons"] = budget_comparisons(results)
    reference = next((r for r in results if r["method"] == PRUNING_REFERENCE), None)
    pruned = [r for r in results if r["budget"] == "25% experts pruned" and r is not reference]
    payload["pruning_comparisons"] = [
        dict(zip(("method", "delta_log_ppl", "delta_stderr"), (r["method"], *paired_log_ratio(reference, r))))
        for r in pruned] if reference else []
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    if figure:
        try:
            from moei2.plot import tradeoff

            tradeoff(payload["tradeoff"]).savefig(out / f"{name}_tradeoff.png", dpi=110)
        except ImportError:
            print("matplotlib is not installed: no trade-off figure", file=sys.stderr)
    lines = [f"Model: {payload.get('bundled_model', 'demo')}. Perplexity ± its standard error over the held-out "
             "windows; zero-shot accuracy ± the standard error of the task average.", "",
             "| method | budget | held-out ppl (± s.e.) | zero-shot acc (± s.e.) | expert params removed "
             "| compress s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['budget']} | {r['perplexity']:.3f} ± {r['perplexity_stderr']:.3f} "
                     f"| {r['accuracy']:.4f} ± {r['accuracy_stderr']:.4f} | "
                     f"{100 * r['expert_params_removed']:.1f}% | {r['compress_seconds']:.1f} |")
    if payload["budget_comparisons"]:
        lines += ["", "Budget mode against the best other method at the same share removed (paired over the "
                  "same held-out windows: the difference in log-perplexity ± its standard error; negative "
                  "means budget mode is better).", "",
                  "| removed | budget mode ppl | best other | its ppl | Δ log-ppl (± s.e.) |", "|---|---|---|---|---|"]
        lines += [f"| {100 * c['removed']:.0f}% | {c['budget_ppl']:.3f} | {c['best_other']} | {c['best_other_ppl']:.3f} "
                  f"| {c['delta_log_ppl']:+.4f} ± {c['delta_stderr']:.4f} |" for c in payload["budget_comparisons"]]
    if payload["pruning_comparisons"]:
        lines += ["", f"25 % of the experts pruned: {PRUNING_REFERENCE} against each other selection, paired over "
                  "the same windows (log-perplexity of the search minus the other's; negative means the "
                  "search is better).", "", "| selection | Δ log-ppl (± s.e.) |", "|---|---|"]
        lines += [f"| {c['method']} | {c['delta_log_ppl']:+.4f} ± {c['delta_stderr']:.4f} |"
                  for c in payload["pruning_comparisons"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
