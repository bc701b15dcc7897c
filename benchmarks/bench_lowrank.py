"""Truncation-aware low-rank decomposition: moei2 against SVD-LLM's recipe, in one process.

For each weight shape and parameter-keep fraction this measures
  (a) moei2.lowrank.decompose: top-r eigenvectors of W G W^T in float64, no Cholesky, no inverse;
  (b) the SVD-LLM research-code recipe: float64 Cholesky of G (on failure shifted by
      -lambda_min + 1e-6, as SVD-LLM does), explicit float64 inverse, both cast to float32,
      full float32 SVD of W S, A = U_r sqrt(Sigma_r), B = sqrt(Sigma_r) V_r^T S^-1
      (NumPy by default, whose OpenBLAS matches moei2's; --baseline torch runs SVD-LLM's own
      torch calls, which on this machine's AMD CPU go through MKL and are slower still);
  (c) the exact optimum in float64: the discarded singular values of W X^T.
The loss of (a) and (b) is measured from their factors, ||(W - A B) X^T||_F in float64, and
reported relative to (c). Since (b) costs the same for any rank, it runs once per shape and its
time is compared with (a) at each rank. moei2's achieved FLOP rate (nominal operation count of
its route / time) is given as a fraction of the float64 GEMM rate measured here.

Grams come from `--rows` random activation rows (default 4096) with per-channel scales and a few
outlier channels, like real hidden states. With 4096 rows the 14336-column Gram is singular, as
for rarely routed experts: the recipe then takes its eigenvalue-shift path.

    python benchmarks/bench_lowrank.py            # every shape, keep 0.4 and 0.7 (minutes)
    python benchmarks/bench_lowrank.py --quick    # the two small shapes at keep 0.4 (< 1 min)

Writes benchmarks/results/bench_lowrank{,_quick}.json and .md.
"""
import argparse
import json
import os
import platform
import time

import numpy as np

import moei2
from moei2.lowrank import decompose

SHAPES = [(1408, 2048), (2048, 1408), (14336, 4096), (4096, 14336)]
KEEPS = [0.4, 0.7]
HERE = os.path.dirname(os.path.abspath(__file__))


def activations(rng, rows, n, outliers=6):
    x = rng.standard_normal((rows, n), dtype=np.float32)
    x *= np.exp(rng.normal(0.0, 0.5, size=n)).astype(np.float32)  # uneven channel scales
    x[:, rng.choice(n, size=outliers, replace=False)] *= 60.0  # massive-activation channels
    return x


def weight(rng, m, n):
    w = rng.standard_normal((m, n), dtype=np.float32) / np.float32(np.sqrt(n))
    low = rng.standard_normal((m, 64), dtype=np.float32) @ rng.standard_normal((64, n), dtype=np.float32)
    return np.ascontiguousarray(w + low / np.float32(8 * np.sqrt(n)))


def rank_for(keep, m, n):
    return max(1, int(keep * m * n / (m + n)))


def gemm_rate(dtype, size=2048, repeats=3):
    a = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
    a @ a
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def moei2_flops(m, n, r):
    """Nominal floating-point operations of moei2's route for one decomposition with a Gram."""
    if m <= n:
        return 2.0 * n * n * m + m * m * n + 4.0 / 3.0 * m**3 + 2.0 * m * m * r + 2.0 * m * n * r
    return (2.0 * m * n * n - 2.0 / 3.0 * n**3 + 2.0 * n**3 + 4.0 / 3.0 * n**3 + 2.0 * n * n * r
            + 4.0 * m * n * r - 2.0 * n * n * r + n * n * r)


class SvdLlm:
    """SVD-LLM's whitening recipe; factors for any rank from one SVD."""

    def __init__(self, w, gram, backend):
        self.torch = None
        if backend == "torch":
            import torch

            self.torch = torch
            self._run_torch(np.ones((2, 2), np.float32), np.eye(2))  # first-call initialisation
        start = time.perf_counter()
        if self.torch is not None:
            self._run_torch(w, gram)
        else:
            self._run_numpy(w, gram)
        self.seconds = time.perf_counter() - start
        self.backend = "torch" if self.torch is not None else "numpy"

    def _run_torch(self, w, gram):
        torch = self.torch
        g = torch.from_numpy(gram)
        self.shifted = False
        try:
            s = torch.linalg.cholesky(g)
        except RuntimeError:  # torch.linalg.LinAlgError
            eig = torch.linalg.eigvalsh(g)
            g = g + (-eig[0] + 1e-6) * torch.eye(g.shape[0], dtype=g.dtype)
            s = torch.linalg.cholesky(g)
            self.shifted = True
        s_inv = torch.linalg.inv(s).float()
        s = s.float()
        u, sigma, vt = torch.linalg.svd(torch.from_numpy(w) @ s, full_matrices=False)
        self._parts = (u, sigma, vt, s_inv)

    def _run_numpy(self, w, gram):
        self.shifted = False
        try:
            s = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            eig = np.linalg.eigvalsh(gram)
            s = np.linalg.cholesky(gram + (-eig[0] + 1e-6) * np.eye(gram.shape[0]))
            self.shifted = True
        s_inv = np.linalg.inv(s).astype(np.float32)
        s = s.astype(np.float32)
        u, sigma, vt = np.linalg.svd(w @ s, full_matrices=False)
        self._parts = (u, sigma, vt, s_inv)

    def factors(self, r):
        u, sigma, vt, s_inv = self._parts
        if self.torch is not None:
            root = self.torch.sqrt(sigma[:r])
            a = u[:, :r] * root
            b = (root[:, None] * vt[:r]) @ s_inv
            return a.numpy(), b.numpy()
        root = np.sqrt(sigma[:r])
        return u[:, :r] * root, (root[:, None] * vt[:r]) @ s_inv


def weighted_loss(w, a, b, x64):
    d = w.astype(np.float64) - a.astype(np.float64) @ b.astype(np.float64)
    return float(np.linalg.norm(d @ x64.T))


def exact_spectrum(w, x64):
    """Squared singular values of W X^T (descending), in float64: W G W^T's spectrum."""
    mx = w.astype(np.float64) @ x64.T
    small = mx @ mx.T if mx.shape[0] <= mx.shape[1] else mx.T @ mx
    return np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None)


def run(shapes, keeps, rows, seed, backend):
    rng = np.random.default_rng(seed)
    threads = moei2.blas_info()["num_threads"]
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    rates = {"dgemm": gemm_rate(np.float64), "sgemm": gemm_rate(np.float32)}
    records = []
    for m, n in shapes:
        x = activations(rng, rows, n)
        x64 = x.astype(np.float64)
        gram = x64.T @ x64
        w = weight(rng, m, n)
        spectrum = exact_spectrum(w, x64)
        baseline = SvdLlm(w, gram, backend)
        for keep in keeps:
            r = rank_for(keep, m, n)
            start = time.perf_counter()
            a, b, info = decompose(w, gram, r, return_info=True)
            seconds = time.perf_counter() - start
            exact = float(np.sqrt(np.sum(spectrum[r:])))
            ours = weighted_loss(w, a, b, x64)
            base_a, base_b = baseline.factors(r)
            theirs = weighted_loss(w, base_a, base_b, x64)
            flops = moei2_flops(m, n, r)
            record = {
                "shape": [m, n], "keep": keep, "rank": r, "rows": rows,
                "moei2_seconds": seconds, "svdllm_seconds": baseline.seconds,
                "speedup": baseline.seconds / seconds,
                "exact_loss": exact,
                "moei2_loss": ours, "moei2_reported_loss": info["loss"],
                "svdllm_loss": theirs,
                "moei2_rel_excess": (ours - exact) / exact,
                "moei2_reported_rel_error": abs(info["loss"] - exact) / exact,
                "svdllm_rel_excess": (theirs - exact) / exact,
                "moei2_method": info["method"], "moei2_fallback": info["fallback"],
                "svdllm_backend": baseline.backend, "svdllm_shifted_gram": baseline.shifted,
                "moei2_gflops": flops / seconds / 1e9,
                "moei2_fraction_of_dgemm": flops / seconds / rates["dgemm"],
            }
            records.append(record)
            print(f"{m}x{n} keep {keep} rank {r}: moei2 {seconds:.2f}s, SVD-LLM {baseline.seconds:.2f}s "
                  f"({record['speedup']:.1f}x); loss vs exact: moei2 {record['moei2_rel_excess']:+.1e}, "
                  f"SVD-LLM {record['svdllm_rel_excess']:+.1e}; {record['moei2_gflops']:.1f} GFLOP/s = "
                  f"{record['moei2_fraction_of_dgemm']:.2f} of dgemm", flush=True)
        del baseline, gram, x, x64
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "blas": moei2.blas_info(), "threads": threads},
        "gemm_gflops": {k: v / 1e9 for k, v in rates.items()},
        "results": records,
    }


def markdown(report, command):
    lines = [
        f"`{command}`: SVD-LLM recipe in {report['results'][0]['svdllm_backend']}, {report['machine']['threads']} threads, {report['results'][0]['rows']} activation rows; "
        f"measured dgemm {report['gemm_gflops']['dgemm']:.0f} GFLOP/s, sgemm {report['gemm_gflops']['sgemm']:.0f} GFLOP/s.",
        "",
        "| W (m x n) | keep | rank | moei2 s | SVD-LLM s | speed-up | moei2 loss / exact - 1 | SVD-LLM loss / exact - 1 | moei2 GFLOP/s (of dgemm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        shifted = " (shifted G)" if r["svdllm_shifted_gram"] else ""
        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['keep']} | {r['rank']} | {r['moei2_seconds']:.2f} | "
            f"{r['svdllm_seconds']:.2f}{shifted} | {r['speedup']:.1f}x | {r['moei2_rel_excess']:.1e} | "
            f"{r['svdllm_rel_excess']:.1e} | {r['moei2_gflops']:.1f} ({r['moei2_fraction_of_dgemm']:.2f}) |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two small shapes at keep 0.4 only")
    parser.add_argument("--rows", type=int, default=4096, help="activation rows behind each Gram (>= 4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", choices=["numpy", "torch"], default="numpy",
                        help="library running the SVD-LLM recipe")
    args = parser.parse_args()
    shapes, keeps = (SHAPES[:2], KEEPS[:1]) if args.quick else (SHAPES, KEEPS)
    report = run(shapes, keeps, args.rows, args.seed, args.baseline)
    command = "python benchmarks/bench_lowrank.py" + (" --quick" if args.quick else "")
    if args.baseline != "numpy":
        command += f" --baseline {args.baseline}"
    report["command"] = command
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "bench_lowrank_quick" if args.quick else "bench_lowrank")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report, command))
    print(markdown(report, command))


if __name__ == "__main__":
    main()
