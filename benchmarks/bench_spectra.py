"""The report's whitened spectrum of a tall weight: on its smaller side against the full product.

``compress`` records, for expert 0 of the first and last MoE layer, the plain singular values of
the gate weight W (m x n) and the square roots of the eigenvalues of W G W^T. For a tall weight
(Mixtral-8x7B's gate is 14336 x 4096) W G W^T is m x m; with W = QR it has the same non-zero
eigenvalues as R G R^T, n x n, which is what ``moei2.stages.decomposition._spectra`` now solves.
Both run here in one process on the same random weight and Gram, the full product as the baseline.

    python benchmarks/bench_spectra.py                  # Mixtral-8x7B gate widths (a few minutes)
    python benchmarks/bench_spectra.py --m 2816 --n 1024  # quicker

Writes benchmarks/results/bench_spectra.json and .md.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=14336, help="weight rows (the expert's intermediate width)")
    ap.add_argument("--n", type=int, default=4096, help="weight columns (the hidden width)")
    ap.add_argument("--rows", type=int, default=2048, help="activation rows behind the Gram")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.m <= args.n:
        raise SystemExit("--m must exceed --n: the smaller side only differs for a tall weight")
    rng = np.random.default_rng(args.seed)
    w = rng.standard_normal((args.m, args.n)) / np.sqrt(args.n)
    x = rng.standard_normal((args.rows, args.n))
    gram = x.T @ x

    started = time.perf_counter()
    side = np.linalg.qr(w, mode="r")
    smaller = np.linalg.eigvalsh(side @ gram @ side.T)[::-1]
    smaller_s = time.perf_counter() - started
    started = time.perf_counter()
    full = np.linalg.eigvalsh(w @ gram @ w.T)[::-1][: args.n]
    full_s = time.perf_counter() - started

    result = {"m": args.m, "n": args.n, "rows": args.rows, "cpus": os.cpu_count(),
              "full_product_s": round(full_s, 2), "smaller_side_s": round(smaller_s, 2),
              "speedup": round(full_s / smaller_s, 2),
              "max_difference_over_largest": float(np.max(np.abs(full - smaller)) / full[0])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_spectra.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "bench_spectra.md").write_text(
        "# Report spectrum of a tall weight\n\n"
        f"`python benchmarks/bench_spectra.py --m {args.m} --n {args.n} --rows {args.rows}` "
        f"({result['cpus']} CPUs)\n\n"
        "| weight | full product W G W^T s | smaller side R G R^T s | speedup | max difference / largest |\n"
        "|---|---|---|---|---|\n"
        f"| {args.m} x {args.n} | {full_s:.1f} | {smaller_s:.1f} | {result['speedup']:.1f} | "
        f"{result['max_difference_over_largest']:.1e} |\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
