"""Speed and memory of the layer search cache (moei2.search) on layers shaped like real models.

For each layer shape (Qwen1.5-MoE-A2.7B: E=60, k=4, r=15; DeepSeek-V2-Lite: E=64, k=6, r=16;
d=2048, 8192 calibration tokens in 4 batches) with synthetic router logits and expert outputs:

  * masks scored per second by Layer.loss (one thread and all threads) against the reference
    approach run in the same process: the re-routed MoE output recomputed per mask from the
    cached outputs of each token's candidate experts (torch, float32, all threads), then the
    per-batch Frobenius norms;
  * agreement of the two on the masks the reference scored;
  * cache memory against the dense candidate-output cache the reference needs;
  * wall time of the full genetic search (population 100, 50 generations) on one core.

Cache construction (``--construction``; each figure a ratio measured inside one process):

  * ``Layer.from_moe`` on a Qwen1.5-MoE-width layer (H=2048, 60 experts of width 1408, top-4,
    r_max=15) against the bare candidate-output GEMMs of the same shapes in torch float32 on all
    threads, in a fresh process (from_moe first) and in a process that ran torch work first;
  * the factor step (``SearchCache.factor_outputs``) in GFLOP/s beside the machine's dgemm.

    python benchmarks/bench_search.py [--quick] [--out benchmarks/results]
    python benchmarks/bench_search.py --construction [--tokens 2048 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

LAYERS = [
    # name, E, k, r, renormalize, scaling
    ("Qwen1.5-MoE-A2.7B layer", 60, 4, 15, False, 1.0),
    ("DeepSeek-V2-Lite layer", 64, 6, 16, False, 1.0),
]


def synthetic_layer(E, k, r, N, d, seed):
    """Router logits with per-expert biases (uneven load, as trained routers have) and expert
    outputs sharing a per-token component (experts see the same input) plus an expert-specific
    direction and noise, each expert with its own output scale."""
    from moei2 import _core

    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, 0.7, size=E)
    logits = bias + rng.normal(0.0, 1.2, size=(N, E))
    C = k + r
    cache = _core.SearchCache(logits, top_k=k, r_max=r, renormalize=False, scaling_factor=1.0,
                              batch_ends=np.array([N], dtype=np.int64))
    candidates = cache.candidates(0, N)
    mean = rng.normal(0.0, 1.0, size=(E, d)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, size=E).astype(np.float32)
    outputs = np.empty((N, C, d), dtype=np.float32)
    for s in range(0, N, 512):
        cand = candidates[s:s + 512]
        n = cand.shape[0]
        shared = rng.standard_normal((n, 1, d), dtype=np.float32)
        noise = rng.standard_normal((n, C, d), dtype=np.float32)
        outputs[s:s + n] = scale[cand][:, :, None] * (0.4 * mean[cand] + 0.7 * shared + 0.6 * noise)
    return logits, candidates, outputs


def reference_losses(torch, logits, candidates, outputs, masks, k, renormalize, scaling, batch_ends):
    """Recomputes the re-routed output per mask from the cached candidate outputs."""
    O = torch.from_numpy(outputs)
    z = torch.from_numpy(logits)
    cand = torch.from_numpy(candidates.astype(np.int64))
    N, C = cand.shape

    def routed(drop):                                   # drop: bool [E] tensor
        zz = z.masked_fill(drop[None, :], float("-inf"))
        p = torch.softmax(zz, dim=1)
        cdrop = drop[cand]
        rank = torch.cumsum((~cdrop).to(torch.int64), dim=1)
        chosen = (~cdrop) & (rank <= k)                 # first k surviving candidates
        w = torch.where(chosen, torch.gather(p, 1, cand), torch.zeros((), dtype=p.dtype))
        if renormalize:
            w = w / w.sum(dim=1, keepdim=True)
        w = (scaling * w).to(torch.float32)
        return torch.einsum("nc,ncd->nd", w, O)

    y = routed(torch.zeros(z.shape[1], dtype=torch.bool))
    out = []
    for m in masks:
        ys = routed(torch.from_numpy(m))
        diff = (y - ys).double()
        loss, start = 0.0, 0
        for end in batch_ends:
            loss += torch.linalg.vector_norm(diff[start:end]).item()
            start = end
        out.append(loss)
    return np.array(out)


def random_masks(rng, M, E, r):
    masks = np.zeros((M, E), dtype=bool)
    for i in range(M):
        masks[i, rng.choice(E, size=r, replace=False)] = True
    return masks


def run_layer(name, E, k, r, renormalize, scaling, N, d, num_masks, num_reference, seed):
    import torch

    from moei2 import search

    batch_sizes = [N // 4] * 4
    logits, candidates, outputs = synthetic_layer(E, k, r, N, d, seed)
    t = time.perf_counter()
    layer = search.Layer._build(logits, N, E, k, r, renormalize, scaling, batch_sizes,
                                lambda cand, first: outputs[first:first + cand.shape[0]])
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(seed + 1)
    masks = random_masks(rng, num_masks, E, r)

    # reference: torch, all threads
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ref_masks = masks[:num_reference]
    reference_losses(torch, logits, candidates, outputs, ref_masks[:1], k, renormalize, scaling,
                     layer.batch_ends)  # warm-up
    t = time.perf_counter()
    ref = reference_losses(torch, logits, candidates, outputs, ref_masks, k, renormalize, scaling, layer.batch_ends)
    ref_rate = len(ref_masks) / (time.perf_counter() - t)

    layer.num_threads = 1
    layer.loss(masks[:16])
    t = time.perf_counter()
    ours1 = layer.loss(masks)
    rate1 = num_masks / (time.perf_counter() - t)
    layer.num_threads = max(1, os.cpu_count() or 1)
    t = time.perf_counter()
    ours_all = layer.loss(masks)
    rate_all = num_masks / (time.perf_counter() - t)
    assert np.array_equal(ours1, ours_all), "thread count changed a loss"
    agreement = float(np.max(np.abs(ours1[:num_reference] - ref) / ref))

    layer.num_threads = 1
    t, c = time.perf_counter(), time.process_time()
    ga = layer.genetic(r, k_best=3, seed=seed)
    ga_s, ga_cpu = time.perf_counter() - t, time.process_time() - c
    dense_bytes = outputs.nbytes
    return {
        "layer": name, "num_experts": E, "top_k": k, "r": r, "tokens": N, "hidden": d,
        "renormalize": renormalize, "scaling": scaling,
        "cache_build_s": build_s,
        "cache_bytes": layer.memory_bytes, "dense_candidate_output_bytes": dense_bytes,
        "reference_masks_per_s": ref_rate,
        "masks_per_s_1_thread": rate1, "masks_per_s_all_threads": rate_all,
        "threads": max(1, os.cpu_count() or 1),
        "speedup_1_thread": rate1 / ref_rate, "speedup_all_threads": rate_all / ref_rate,
        "max_relative_difference_vs_reference": agreement,
        "genetic_100x50_s_1_thread": ga_s, "genetic_100x50_cpu_s": ga_cpu,
        "load_average_1min": os.getloadavg()[0], "genetic_evaluations": ga.evaluations,
        "genetic_best_loss": float(ga.losses[0]),
        "genetic_generations": len(ga.history["best"]),
    }


def markdown(results, meta):
    lines = [
        "# Layer search cache: masks scored per second", "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}, {meta['cpus']} CPUs. "
        "Reference = re-routed output recomputed per mask from cached candidate outputs "
        "(torch float32, all threads), in the same process. Load average during the run: "
        f"{meta['load_average_1min']:.1f} (shared machine: wall times include waiting for a core; "
        "GA CPU s is the search's own processor time).", "",
        "| layer | E | k | r | tokens | d | reference masks/s | moei2 masks/s (1 thread) | moei2 masks/s "
        "(all threads) | speed-up (1 thread) | max rel. diff | cache MiB | dense outputs MiB | "
        "GA 100x50 (1 core) wall s | GA CPU s | GA evaluations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['layer']} | {r['num_experts']} | {r['top_k']} | {r['r']} | {r['tokens']} | {r['hidden']} | "
            f"{r['reference_masks_per_s']:.2f} | {r['masks_per_s_1_thread']:.0f} | {r['masks_per_s_all_threads']:.0f} | "
            f"{r['speedup_1_thread']:.0f}x | {r['max_relative_difference_vs_reference']:.1e} | "
            f"{r['cache_bytes'] / 2**20:.0f} | {r['dense_candidate_output_bytes'] / 2**20:.0f} | "
            f"{r['genetic_100x50_s_1_thread']:.3f} | {r['genetic_100x50_cpu_s']:.3f} | {r['genetic_evaluations']} |")
    return "\n".join(lines) + "\n"


# ---- cache construction ------------------------------------------------------------------------

QWEN = dict(E=60, H=2048, I=1408, k=4, r=15)


def _moe_layer(N, seed, E, H, I):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, H), dtype=np.float32)
    router = (0.05 * rng.standard_normal((E, H), dtype=np.float32))
    gu = rng.standard_normal((E, 2 * I, H), dtype=np.float32)
    gu *= np.float32(H ** -0.5)
    dn = rng.standard_normal((E, H, I), dtype=np.float32)
    dn *= np.float32(I ** -0.5)
    return X, router, gu, dn


def _torch_gemms(torch, X, candidates, gu, dn, I):
    """The candidate-output GEMMs alone: per expert, its tokens' gate_up product, SiLU * up, down."""
    x = torch.from_numpy(X)
    flat = torch.from_numpy(candidates.reshape(-1))
    C = candidates.shape[1]
    with torch.no_grad():
        for j in range(gu.shape[0]):
            tok = torch.nonzero(flat == j).flatten() // C
            if tok.numel() == 0:
                continue
            h = x[tok] @ torch.from_numpy(gu[j]).T
            a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            a @ torch.from_numpy(dn[j]).T


def _torch_work(torch, seconds):
    """A stand-in for a calibration forward: float32 matmuls and activations on all threads."""
    a = torch.randn(1024, 2048)
    w = torch.randn(2048, 2048)
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            torch.nn.functional.silu(a @ w)


def construction_worker(mode, N, seed):
    """Runs in its own process; prints one JSON line."""
    from moei2 import search

    E, H, I, k, r = (QWEN[key] for key in ("E", "H", "I", "k", "r"))
    X, router, gu, dn = _moe_layer(N, seed, E, H, I)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if mode == "after_torch":
        _torch_work(torch, 5.0)
    t = time.perf_counter()
    layer = search.Layer.from_moe(X, router, gu, dn, top_k=k, renormalize=False, r_max=r)
    moe_s = time.perf_counter() - t
    candidates = layer._cache.candidates(0, N)
    _torch_gemms(torch, X[:64], candidates[:64], gu, dn, I)  # warm-up
    gemm_s = []
    for _ in range(2):
        t = time.perf_counter()
        _torch_gemms(torch, X, candidates, gu, dn, I)
        gemm_s.append(time.perf_counter() - t)
    flops = 2.0 * N * (k + r) * 3 * H * I
    out = {"mode": mode, "tokens": N, "from_moe_s": moe_s, "torch_gemms_s": min(gemm_s),
           "ratio": moe_s / min(gemm_s), "torch_gemm_gflops": flops / min(gemm_s) / 1e9,
           "qr_tokens": int(layer._cache.qr_tokens), "load_average_1min": os.getloadavg()[0]}
    if mode == "fresh":
        out.update(factor_rate(N, seed, k + r, H))
    print("RESULT " + json.dumps(out), flush=True)


def factor_rate(N, seed, C, d):
    """GFLOP/s of the factor step (the Gram's upper triangle, C (C + 1) d flops per token) beside dgemm's."""
    from moei2 import _core
    from moei2._threads import num_threads

    rng = np.random.default_rng(seed + 7)
    logits = rng.standard_normal((N, 60))
    shared = rng.standard_normal((N, 1, d), dtype=np.float32)
    outputs = rng.standard_normal((N, C, d), dtype=np.float32)
    outputs += shared
    best = float("inf")
    for _ in range(3):
        cache = _core.SearchCache(logits, top_k=4, r_max=C - 4, renormalize=False, scaling_factor=1.0,
                                  batch_ends=np.array([N], dtype=np.int64))
        t = time.perf_counter()
        cache.factor_outputs(outputs, 0, num_threads())
        best = min(best, time.perf_counter() - t)
    a = rng.standard_normal((2048, 2048))
    b = rng.standard_normal((2048, 2048))
    a @ b
    dgemm = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        dgemm = min(dgemm, time.perf_counter() - t)
    return {"factor_s": best, "factor_gflops": N * C * (C + 1) * d / best / 1e9,
            "dgemm_gflops": 2 * 2048 ** 3 / dgemm / 1e9, "factor_qr_tokens": int(cache.qr_tokens)}


def run_construction(tokens, seed):
    import subprocess
    import sys

    results = []
    for N in tokens:
        for mode in ("fresh", "after_torch"):
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--tokens", str(N), "--seed", str(seed)],
                                  capture_output=True, text=True, check=True)
            line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
            res = json.loads(line[len("RESULT "):])
            print(json.dumps(res), flush=True)
            results.append(res)
    return results


def construction_markdown(results, command):
    lines = [
        "## Cache construction: Layer.from_moe against the bare GEMMs", "",
        f"Command: `{command}`. Qwen1.5-MoE-width layer (H=2048, 60 experts of width 1408, top-4, r_max=15, "
        "C=19 candidates per token). Each row is one process: *fresh* times from_moe before any torch work, "
        "*after torch* after 5 s of torch float32 matmuls on all threads; then, in the same process, the bare "
        "candidate-output GEMMs (per expert: gathered tokens @ gate_up^T, SiLU * up, @ down^T) in torch "
        "float32 on all threads. Goal: ratio <= 1.3.", "",
        "| tokens | process | from_moe s | torch GEMMs s | ratio | torch GEMM GFLOP/s | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['tokens']} | {r['mode'].replace('_', ' ')} | {r['from_moe_s']:.2f} | "
                     f"{r['torch_gemms_s']:.2f} | {r['ratio']:.2f} | {r['torch_gemm_gflops']:.0f} | "
                     f"{r['load_average_1min']:.1f} |")
    lines += ["", "## Factor step against dgemm", "",
              "SearchCache.factor_outputs on float32 outputs [N, 19, 2048] (per token: float64 Gram by a "
              "register-tiled kernel, Cholesky, QR where ill-conditioned), on the C pool; GFLOP/s counts the "
              "C(C+1)d flops of the Gram's upper triangle per token. dgemm: NumPy float64 2048^3 on all threads, "
              "same process. Goal: factor >= dgemm / 2.", "",
              "| tokens | factor s | factor GFLOP/s | dgemm GFLOP/s | ratio | tokens via QR |", "|---|---|---|---|---|---|"]
    for r in results:
        if "factor_s" in r:
            lines.append(f"| {r['tokens']} | {r['factor_s']:.3f} | {r['factor_gflops']:.1f} | "
                         f"{r['dgemm_gflops']:.1f} | {r['factor_gflops'] / r['dgemm_gflops']:.2f} | "
                         f"{r['factor_qr_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1024 tokens, d=512, fewer masks")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--construction", action="store_true", help="only the cache-construction figures")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--worker", choices=["fresh", "after_torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        construction_worker(args.worker, args.tokens[0], args.seed)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.construction:
        command = "python benchmarks/bench_search.py --construction --tokens " + " ".join(map(str, args.tokens))
        cons = run_construction(args.tokens, args.seed)
        stem = "bench_search"
        previous = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
        previous["construction"] = {"command": command, "results": cons}
        (out / f"{stem}.json").write_text(json.dumps(previous, indent=1))
        md = markdown(previous["results"], previous["meta"]) if "results" in previous else ""
        (out / f"{stem}.md").write_text(md + "\n" + construction_markdown(cons, command))
        print(construction_markdown(cons, command))
        return
    N, d = (1024, 512) if args.quick else (8192, 2048)
    num_masks, num_reference = (500, 3) if args.quick else (2000, 5)
    results = []
    for name, E, k, r, renorm, scaling in LAYERS:
        res = run_layer(name, E, k, r, renorm, scaling, N, d, num_masks, num_reference, args.seed)
        results.append(res)
        print(json.dumps(res, indent=1))
    meta = {"command": "python benchmarks/bench_search.py" + (" --quick" if args.quick else ""),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "quick": args.quick,
            "load_average_1min": os.getloadavg()[0]}
    stem = "bench_search_quick" if args.quick else "bench_search"
    previous = json.loads((out / f"{stem}.json").read_text()) if (out / f"{stem}.json").exists() else {}
    record = {"meta": meta, "results": results}
    md = markdown(results, meta)
    if "construction" in previous:  # figures of an earlier --construction run stay
        record["construction"] = previous["construction"]
        md += "\n" + construction_markdown(previous["construction"]["results"], previous["construction"]["command"])
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
