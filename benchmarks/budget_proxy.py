"""How close budget mode's truncation costs are to the error measured by running the layer.

For every MoE layer of a bundled model and a few ranks, every expert is truncated (whitened
factors on its Grams, as compression makes them) in one matrix (gate, up or down) or in all three,
and the squared error of the layer's routed output over the calibration tokens is measured by
running the experts with the model's own routing. It is compared with the cost budget mode
predicts (moei2.stages.budget): exact for down up to the routing weights, a proxy for gate and up.
Writes JSON and a markdown table (ratio measured / predicted, per matrix and rank).

    python benchmarks/budget_proxy.py --sequences 32 --seq-len 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import moei2
from moei2.calibrate import ExpertGrams, iter_layer_stats
from moei2.config import full_rank
from moei2.calibration_data import calibration_windows
from moei2.lowrank import decompose
from moei2.models import get_adapter
from moei2.stages.budget import expert_truncation_parts, routing_weight_squares

MATRICES = ("gate", "up", "down")


def routed_weights(stats, view) -> torch.Tensor:
    probs = torch.softmax(stats.router_logits.double(), dim=-1)
    w = probs.gather(1, stats.top_k_index)
    if view.renormalize:
        w = w / w.sum(dim=1, keepdim=True)
    return w * float(view.scaling_factor)


def expert_output(x, gate, up, down, act):
    return act(x @ gate.T) * (x @ up.T) @ down.T


def measure_layer(view, stats, ranks, act):
    """{(which, rank): (measured, predicted)} summed over the layer's experts; "measured" is the
    squared Frobenius norm of the routed output's error over all tokens (cross terms included)."""
    N = stats.X.shape[0]
    X = stats.X.double()
    grams = ExpertGrams(view, stats.X, stats.top_k_index, [slice(0, N)])
    w = routed_weights(stats, view)
    w2 = routing_weight_squares(stats, view)
    cap = full_rank(view.hidden_size, view.intermediate_size)
    cases = [(m, r) for r in ranks for m in (*MATRICES, "all")]
    delta = {c: torch.zeros_like(X) for c in cases}
    predicted = {c: 0.0 for c in cases}
    for j in range(view.num_experts):
        gram_in, gram_down = (g.double().numpy() for g in grams(j))
        dense = [t.double() for t in view.expert(j)]
        rows, slots = (stats.top_k_index == j).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        parts = expert_truncation_parts(view, j, stats.X[rows], cap)
        x, weight = X[rows], w[rows, slots][:, None]
        base = expert_output(x, *dense, act)
        for r in ranks:
            cut = {}
            for name, W, G in zip(MATRICES, dense, (gram_in, gram_in, gram_down)):
                A, B = decompose(W.numpy(), G, r)
                cut[name] = torch.from_numpy(A @ B)
            for m in (*MATRICES, "all"):
                mats = [cut[n] if m in (n, "all") else d for n, d in zip(MATRICES, dense)]
                delta[(m, r)].index_add_(0, rows, weight * (expert_output(x, *mats, act) - base))
                names = MATRICES if m == "all" else (m,)
                predicted[(m, r)] += w2[j] * sum(float(parts[n][r - 1]) for n in names)
    return {c: (float(delta[c].square().sum()), predicted[c]) for c in cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ranks", default="8,16,32,48")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/budget_proxy")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    started = time.perf_counter()
    model, tokenizer = moei2.demo_model()
    model = model.float().eval()
    adapter = get_adapter(model)
    ids = calibration_windows(tokenizer, moei2.demo_texts("calibration"), args.sequences, args.seq_len, args.seed)
    totals = {}
    per_layer = {}
    with torch.no_grad():
        for stats in iter_layer_stats(model, ids, batch_size=8, progress=False, propagate=False):
            view = adapter.view(stats.layer_index)
            act = view.experts_module.act_fn
            result = measure_layer(view, stats, ranks, lambda t: act(t.float()).double())
            per_layer[stats.layer_index] = {f"{m}@{r}": v for (m, r), v in result.items()}
            for c, (meas, pred) in result.items():
                m, p = totals.get(c, (0.0, 0.0))
                totals[c] = (m + meas, p + pred)
    layer_ratios = {c: [per_layer[l][f"{c[0]}@{c[1]}"][0] / per_layer[l][f"{c[0]}@{c[1]}"][1]
                        for l in per_layer if per_layer[l][f"{c[0]}@{c[1]}"][1] > 0] for c in totals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else list(argv)
    record = {"command": "python benchmarks/budget_proxy.py " + " ".join(given),
              "model": "demo", "sequences": args.sequences, "seq_len": args.seq_len, "ranks": ranks,
              "seconds": time.perf_counter() - started,
              "totals": {f"{m}@{r}": {"measured": a, "predicted": b, "ratio": a / b if b else None}
                         for (m, r), (a, b) in totals.items()},
              "per_layer": {str(l): v for l, v in per_layer.items()}}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = ["# Budget mode's truncation costs against the measured layer error (bundled model)", "",
             f"{args.sequences} x {args.seq_len} calibration tokens, every MoE layer; measured / predicted "
             "squared error of the routed output, summed over the layers (min-max over layers in brackets).", "",
             "| rank | " + " | ".join(f"{m} only" if m != "all" else "all three" for m in (*MATRICES, "all")) + " |",
             "|---|" + "---|" * 4]
    for r in ranks:
        cells = []
        for m in (*MATRICES, "all"):
            a, b = totals[(m, r)]
            lr = layer_ratios[(m, r)]
            cells.append(f"{a / b:.3f} [{min(lr):.2f}-{max(lr):.2f}]" if b else "-")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
