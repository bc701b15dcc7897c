"""Peak memory of streamed calibration against collecting every layer at once.

Builds a small random Qwen2-MoE model (8 MoE layers, hidden 256, 16 experts of width 128, top-4,
one shared expert) and 64 sequences of 128 tokens, then measures, each in a fresh process, the
growth of the resident set's high-water mark (VmHWM) above the resident size after the model and
data are built:

  streamed    moei2.calibrate.iter_layer_stats(grams="all"), consuming one layer at a time
  all-layers  one forward pass with hooks keeping X, router logits and Y of every MoE layer
              (no Grams): what a non-streamed collection needs at least

and compares them with the bytes of one layer's statistics. Writes JSON and a markdown table.

    python benchmarks/calibration_memory.py [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS, HIDDEN, EXPERTS, WIDTH, TOP_K, SEQUENCES, SEQ_LEN, BATCH = 8, 256, 16, 128, 4, 64, 128, 8


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build():
    import torch
    import transformers as tf

    cfg = tf.Qwen2MoeConfig(vocab_size=1000, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=8,
                            num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=WIDTH,
                            shared_expert_intermediate_size=512, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                            max_position_embeddings=SEQ_LEN, norm_topk_prob=False)
    torch.manual_seed(0)
    model = tf.Qwen2MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return model, ids


def child(mode: str) -> None:
    import torch

    model, ids = _build()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Touch the code paths once on a sliver of data so lazy allocations do not count as statistics.
    with torch.no_grad():
        model(ids[:1, :8])
    base = _status("VmRSS")
    torch.set_num_threads(1)
    if mode == "streamed":
        from moei2.calibrate import iter_layer_stats

        for stats in iter_layer_stats(model, ids, grams="all", batch_size=BATCH, progress=False):
            del stats
    else:
        from moei2.models import get_adapter

        kept, handles = [], []
        for view in get_adapter(model).moe_layers():
            def pre(module, args):
                kept.append(args[0].reshape(-1, HIDDEN).clone())

            def post(module, args, output):
                kept.append(output.clone())

            handles.append(view.moe_module.register_forward_pre_hook(pre))
            handles.append(view.router.register_forward_hook(lambda m, a, o: kept.append(o[0].clone())))
            handles.append(view.experts_module.register_forward_hook(post))
        with torch.no_grad():
            for s in range(0, SEQUENCES, BATCH):
                model(ids[s:s + BATCH], use_cache=False)
    peak = _status("VmHWM")
    print(json.dumps({"mode": mode, "model_bytes": model_bytes, "peak_growth_bytes": peak - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", choices=["streamed", "all-layers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = {}
    for mode in ("streamed", "all-layers"):
        out = subprocess.run([sys.executable, __file__, "--child", mode], check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = SEQUENCES * SEQ_LEN
    layer_stats = 4 * tokens * (2 * HIDDEN + EXPERTS) + 8 * EXPERTS * (HIDDEN ** 2 + WIDTH ** 2)
    hidden_state = 4 * tokens * HIDDEN
    summary = {
        "model": {"family": "qwen2_moe", "layers": LAYERS, "hidden": HIDDEN, "experts": EXPERTS, "width": WIDTH,
                  "top_k": TOP_K, "model_bytes": results["streamed"]["model_bytes"]},
        "calibration": {"sequences": SEQUENCES, "seq_len": SEQ_LEN, "batch_size": BATCH},
        "one_layer_statistics_bytes": layer_stats, "hidden_state_bytes": hidden_state,
        "streamed_peak_growth_bytes": results["streamed"]["peak_growth_bytes"],
        "all_layers_peak_growth_bytes": results["all-layers"]["peak_growth_bytes"],
        "ratio_streamed_to_all_layers": results["streamed"]["peak_growth_bytes"]
        / results["all-layers"]["peak_growth_bytes"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration_memory.json").write_text(json.dumps(summary, indent=2))
    mib = 2 ** 20
    table = "\n".join([
        "| collection | peak memory growth (MiB) | note |",
        "|---|---|---|",
        f"| streamed, with Grams (`iter_layer_stats`) | {summary['streamed_peak_growth_bytes'] / mib:.1f} | "
        f"one layer's statistics: {layer_stats / mib:.1f} MiB, hidden state {hidden_state / mib:.1f} MiB |",
        f"| all layers at once, no Grams | {summary['all_layers_peak_growth_bytes'] / mib:.1f} | "
        f"X, logits, Y of {LAYERS} layers |",
        "",
        f"model {summary['model']['model_bytes'] / mib:.1f} MiB; {SEQUENCES} x {SEQ_LEN} tokens; "
        f"streamed / all-layers = {summary['ratio_streamed_to_all_layers']:.2f}",
    ])
    (out / "calibration_memory.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
