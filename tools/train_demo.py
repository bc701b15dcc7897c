"""Rebuilds the two bundled demo models and everything behind them from their public-domain text.

Source: Jane Austen's six completed novels, about 4 MB of English prose, read from the Debian
package ``r-cran-janeaustenr`` (see ``demo_corpus.py``). Run from a checkout of moei2; the
outputs land in the checkout's ``moei2/data`` unless ``--out`` says otherwise:

    apt-get download r-cran-janeaustenr          # any Debian/Ubuntu mirror
    python tools/train_demo.py --source r-cran-janeaustenr_1.0.0-1_all.deb
    python tools/train_demo.py --model fine      # the fine-grained model, on the same split and tokenizer

Without ``--source`` the ``data`` stage runs ``apt-get download`` itself. Stages (``--stages``;
default all five for ``--model demo``, ``train,report`` for ``--model fine``, which shares the
first three):

``data``       chapters -> seeded train / calibration / held-out split -> ``data/texts/*.jsonl.gz``
``tokenizer``  byte-level BPE trained on the train split -> ``data/demo_model/tokenizer.json``
``tasks``      multiple-choice zero-shot tasks built from the held-out split -> ``data/tasks``
``train``      the model trained from scratch with a per-layer load-balancing loss -> safetensors
``report``     held-out perplexity vs a unigram baseline, expert utilisation, zero-shot accuracy on
               the local tasks -> ``training_report.json`` beside the weights

The two models (``--model``):

``demo``  Qwen2-MoE, 16 routed experts of width 96, top-4, one gated shared expert -> ``data/demo_model``
``fine``  a miniature DeepSeek-V2-Lite: 64 routed experts of width 48, top-6 (greedy, unnormalised,
          as DeepSeek-V2-Lite routes), 2 shared experts, first layer dense -> ``data/demo_fine``

Every stage is seeded; the split and the tasks are byte-for-byte reproducible. Training is
deterministic for a fixed thread count (floating-point reduction order depends on it). With
``--time-budget M`` (minutes) the step count is fixed after 50 steps from the measured speed,
capped by ``--steps``; the report records it, and ``--steps N --time-budget 0`` repeats the run
exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's moei2, whose data/ this script rewrites

from demo_corpus import (BOOKS, SOURCE_PACKAGE, SPLITS, _task_yaml, book_chapters, build_tasks,  # noqa: E402
                         fetch_source, load_split, read_r_lazyload, split_chapters, write_jsonl_gz)

DATA_DIR = ROOT / "moei2" / "data"
TOKENIZER_DIR = "demo_model"  # both models read the tokenizer trained here
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EOS_TOKEN = "<|endoftext|>"
HELDOUT_SLICE_TOKENS = 2048  # the report's perplexity of the first tokens of the held-out split

# Settings shared by both models: the data, the tokenizer, the tasks and the training loop.
COMMON = dict(
    split_seed=1234, heldout_fraction=0.08, calibration_fraction=0.06,
    vocab_size=4096, max_position_embeddings=1024,
    train_seed=0, batch_size=8, seq_len=256, lr=2e-3, min_lr_ratio=0.1, warmup=100,
    weight_decay=0.1, grad_clip=1.0, threads=1,
    task_seed=2024, task_items=400,
)


def qwen2_moe_config(args, vocab_size: int, eos_token_id: int):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=4 * args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
        shared_expert_intermediate_size=args.shared_expert_intermediate_size,
        num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok, norm_topk_prob=False,
        decoder_sparse_step=1, max_position_embeddings=args.max_position_embeddings,
        router_aux_loss_coef=args.router_aux_loss_coef, tie_word_embeddings=False,
        # No pad_token_id: it would make EOS the embedding's padding_idx and freeze its row, yet EOS
        # is a real input token here (it separates chapters). Padding is the tokenizer's business.
        eos_token_id=eos_token_id, pad_token_id=None, bos_token_id=None,
    )


def deepseek_v2_config(args, vocab_size: int, eos_token_id: int):
    from transformers import DeepseekV2Config

    # DeepSeek-V2-Lite's routing: greedy top-k over one group, no renormalisation, scale 1; its
    # attention without a query low-rank (q_lora_rank None). pad_token_id None as above.
    return DeepseekV2Config(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, moe_intermediate_size=args.moe_intermediate_size,
        n_routed_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok,
        n_shared_experts=args.n_shared_experts, first_k_dense_replace=args.first_k_dense_replace,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=False,
        eos_token_id=eos_token_id, pad_token_id=None, bos_token_id=None,
    )


@dataclass(frozen=True)
class DemoModel:
    """One bundled model: where it lives under data/, its architecture and its own defaults."""
    directory: str
    model_class: str          # a transformers class name
    build_config: Callable    # (args, vocab_size, eos_token_id) -> a transformers config
    defaults: dict            # architecture and the training settings that differ between models
    stages: tuple             # what a bare run rebuilds
    report_fields: tuple      # config attributes the report's "architecture" lists


STAGES = ("data", "tokenizer", "tasks", "train", "report")

# The defaults are those that produced the shipped models (each training_report.json records its run).
MODELS = {
    "demo": DemoModel(
        directory="demo_model", model_class="Qwen2MoeForCausalLM", build_config=qwen2_moe_config,
        defaults=dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                      num_experts=16, num_experts_per_tok=4, moe_intermediate_size=96,
                      shared_expert_intermediate_size=256, router_aux_loss_coef=0.02,
                      steps=2400, time_budget=20.0),
        stages=STAGES,
        report_fields=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                       "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                       "norm_topk_prob"),
    ),
    "fine": DemoModel(
        directory="demo_fine", model_class="DeepseekV2ForCausalLM", build_config=deepseek_v2_config,
        # 64 experts share 7.8 M parameters (31 MB in float32), so both models fit a 60 MiB package.
        defaults=dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                      num_experts=64, num_experts_per_tok=6, moe_intermediate_size=48, n_shared_experts=2,
                      first_k_dense_replace=1, intermediate_size=512, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, router_aux_loss_coef=0.3,
                      steps=4000, time_budget=30.0),
        stages=("train", "report"),
        report_fields=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                       "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                       "first_k_dense_replace", "intermediate_size", "kv_lora_rank", "topk_method",
                       "routed_scaling_factor"),
    ),
}


def moe_layer_indices(config) -> list[int]:
    """Decoder layers with a router: all of them but DeepSeek's leading dense ones (both recipes
    here route in every layer after those)."""
    return list(range(getattr(config, "first_k_dense_replace", 0), config.num_hidden_layers))


# ---- data, tokenizer, tasks ------------------------------------------------------------------

def stage_data(args, out: Path):
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = fetch_source(args.source, Path(tmp))
        objects = read_r_lazyload(data_dir)
    missing = [b for b in BOOKS if b not in objects]
    if missing:
        raise RuntimeError(f"source data lacks {missing}")
    chapters = [c for book in BOOKS for c in book_chapters(objects[book], book)]
    splits = split_chapters(chapters, args.split_seed, args.heldout_fraction, args.calibration_fraction)
    for name, rows in splits.items():
        write_jsonl_gz(out / "texts" / f"austen_{name}.jsonl.gz", rows)
    summary = {name: {"chapters": len(rows), "characters": sum(len(r["text"]) for r in rows)}
               for name, rows in splits.items()}
    print("data:", json.dumps(summary))
    return summary


def stage_tokenizer(args, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = load_split(out, "train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   model_max_length=args.max_position_embeddings)
    model_dir = out / TOKENIZER_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(model_dir)
    print(f"tokenizer: vocab {tok.get_vocab_size()}")


def stage_tasks(args, out: Path):
    tasks = build_tasks(load_split(out, "heldout"), load_split(out, "train"), args.task_seed, args.task_items)
    task_dir = out / "tasks"
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    for name, rows in tasks.items():
        if len(rows) < args.task_items:
            raise RuntimeError(f"task {name}: only {len(rows)} of {args.task_items} items could be built")
        (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
        (task_dir / f"{name}.yaml").write_text(_task_yaml(name))
    print("tasks:", {name: len(rows) for name, rows in tasks.items()})


def encode_split(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of the texts, each followed by EOS: the stream every stage trains/evaluates on."""
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


# ---- training --------------------------------------------------------------------------------

def load_balancing_loss(router_logits, top_k: int):
    """Switch-style balance loss E * sum_i f_i * P_i, computed per layer and averaged.

    transformers' own ``load_balancing_loss_func`` pools the counts of all layers before
    multiplying, so it only balances expert j summed over layers; a demo for expert pruning needs
    every layer balanced.
    """
    import torch

    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        dispatch = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k
        losses.append(num_experts * (dispatch * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def stage_train(args, out: Path):
    import torch
    import transformers
    from transformers import AutoTokenizer

    recipe = MODELS[args.model]
    model_dir = out / recipe.directory
    model_dir.mkdir(parents=True, exist_ok=True)
    if recipe.directory != TOKENIZER_DIR:
        for name in TOKENIZER_FILES:
            shutil.copyfile(out / TOKENIZER_DIR / name, model_dir / name)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.train_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    stream = torch.from_numpy(encode_split(tokenizer, load_split(out, "train")))
    valid = torch.from_numpy(encode_split(tokenizer, load_split(out, "calibration")))
    config = recipe.build_config(args, len(tokenizer), tokenizer.eos_token_id)
    model = getattr(transformers, recipe.model_class)(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(args.train_seed)
    history, started = [], time.perf_counter()
    n_windows = len(stream) - args.seq_len - 1
    steps, planned_at = args.steps, None
    step = 0
    while step < steps:
        if args.time_budget > 0 and step == min(50, args.warmup) and planned_at is None:
            # Fix the step count once, from the measured speed, while still in warm-up: the cosine
            # schedule then depends only on the final count, and rerunning with --steps <that
            # count> --time-budget 0 repeats the run exactly.
            elapsed = time.perf_counter() - started
            affordable = step + int((args.time_budget * 60 - elapsed) / (elapsed / step))
            steps, planned_at = max(args.warmup + 1, min(args.steps, affordable)), step
            print(f"train: {elapsed / step:.2f}s/step -> {steps} steps in the {args.time_budget} min budget", flush=True)
        starts = rng.integers(0, n_windows, size=args.batch_size)
        batch = torch.stack([stream[s:s + args.seq_len] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        outputs = model(input_ids=batch, output_router_logits=True, use_cache=False)
        lm_loss = torch.nn.functional.cross_entropy(
            outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = load_balancing_loss(outputs.router_logits, config.num_experts_per_tok)
        loss = lm_loss + args.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            entry = {"step": step, "lm_loss": round(lm_loss.item(), 4), "aux": round(aux.item(), 4),
                     "lr": lr_at(step), "seconds": round(time.perf_counter() - started, 1)}
            if step % 400 == 0 or step == steps - 1:
                entry["calibration_loss"] = round(_mean_loss(model, valid, args.seq_len, max_windows=32), 4)
                model.train()
            history.append(entry)
            print("train:", json.dumps(entry), flush=True)
        step += 1
    seconds = time.perf_counter() - started
    model.eval()
    model.config.use_cache = True
    # float32 so the reference model carries no rounding of its own.
    model.save_pretrained(model_dir)
    tokens = steps * args.batch_size * args.seq_len
    meta = {"seconds": round(seconds, 1), "steps": steps, "steps_requested": args.steps,
            "time_budget_minutes": args.time_budget, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "tokens_seen": tokens, "train_tokens": int(len(stream)),
            "epochs": round(tokens / len(stream), 2), "threads": args.threads, "history": history,
            "hyperparameters": {k: getattr(args, k) for k in settings_of(args.model)}}
    (model_dir / "training_log.json").write_text(json.dumps(meta, indent=1))
    print(f"train: {seconds:.0f}s for {steps} steps")


def _mean_loss(model, ids, seq_len: int, max_windows: int | None = None) -> float:
    import torch

    n = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 8):
            rows = torch.stack([ids[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + 8))])
            logits = model(input_ids=rows[:, :-1], use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                    rows[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += rows[:, 1:].numel()
    return total / count


# ---- report ---------------------------------------------------------------------------------

def unigram_baseline(tokenizer, train_texts: list[str], eval_ids: np.ndarray) -> float:
    """Perplexity of the add-one-smoothed unigram distribution of the train split on ``eval_ids``:
    the floor any model that ignores context can reach, so the trained model must be far below it."""
    from moei2.evaluate import _encode_joined

    counts = np.bincount(_encode_joined(tokenizer, train_texts), minlength=len(tokenizer)).astype(np.float64)
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return float(np.exp(-log_probs[eval_ids].mean()))


def expert_utilisation(model, ids, seq_len: int, top_k: int) -> dict:
    """Share of top-k routing slots each expert receives, per MoE layer, over ``ids`` in windows."""
    import torch

    counts = None
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len + 1, seq_len * 8):
            rows = [ids[s:s + seq_len] for s in range(start, min(start + seq_len * 8, len(ids) - seq_len + 1), seq_len)]
            out = model(input_ids=torch.as_tensor(np.stack(rows)), output_router_logits=True, use_cache=False)
            per_layer = [torch.bincount(torch.topk(r.float(), top_k, dim=-1).indices.reshape(-1),
                                        minlength=r.shape[-1]) for r in out.router_logits]
            batch = torch.stack(per_layer).double()
            counts = batch if counts is None else counts + batch
    share = (counts / counts.sum(dim=1, keepdim=True)).numpy()
    layers = []
    for layer, row in zip(moe_layer_indices(model.config), share):
        entropy = float(-(row[row > 0] * np.log(row[row > 0])).sum() / np.log(len(row)))
        layers.append({"layer": layer, "share": [round(float(x), 5) for x in row],
                       "min_share": round(float(row.min()), 5), "max_share": round(float(row.max()), 5),
                       "normalised_entropy": round(entropy, 4)})
    return {"uniform_share": round(1.0 / share.shape[1], 5), "tokens": int(counts[0].sum().item() // top_k),
            "layers": layers}


def stage_report(args, out: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moei2.evaluate import _encode_joined, _windows, perplexity

    recipe = MODELS[args.model]
    torch.set_num_threads(args.threads)
    model_dir = out / recipe.directory
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    heldout = load_split(out, "heldout")
    ppl = perplexity(model, tokenizer, heldout, seq_len=args.seq_len)
    # A slice a unit test can score in a second, to check that the shipped weights are these.
    slice_ppl = perplexity(model, tokenizer, heldout, seq_len=args.seq_len, max_tokens=HELDOUT_SLICE_TOKENS)
    # The unigram baseline is scored on exactly the targets perplexity() scores.
    targets = np.concatenate([w[1:] for w in _windows(_encode_joined(tokenizer, heldout), args.seq_len)])
    unigram = unigram_baseline(tokenizer, load_split(out, "train"), targets)
    utilisation = expert_utilisation(model, _encode_joined(tokenizer, heldout), args.seq_len,
                                     model.config.num_experts_per_tok)
    log = json.loads((model_dir / "training_log.json").read_text())
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    report = {
        "source": f"Jane Austen's six novels, Debian package {SOURCE_PACKAGE} (CRAN janeaustenr)",
        "splits": {s: {"chapters": len(load_split(out, s)),
                       "tokens": int(len(_encode_joined(tokenizer, load_split(out, s))))} for s in SPLITS},
        "architecture": {
            "class": type(model).__name__, **{k: getattr(config, k) for k in recipe.report_fields},
            "parameters": n_params, "routed_expert_parameters": n_routed,
            "safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
        },
        "training": {k: v for k, v in log.items() if k != "history"},
        "history": log["history"],
        "heldout": {"seq_len": args.seq_len, "tokens": ppl["tokens"], "perplexity": round(ppl["perplexity"], 4),
                    "unigram_perplexity": round(unigram, 4),
                    "ratio_to_unigram": round(ppl["perplexity"] / unigram, 4),
                    "slice_max_tokens": HELDOUT_SLICE_TOKENS, "slice_perplexity": round(slice_ppl["perplexity"], 4)},
        "expert_utilisation": utilisation,
    }
    try:
        from moei2.evaluate import zero_shot
    except ImportError:
        zero_shot = None
    if zero_shot is not None and (out / "tasks").is_dir() and out.resolve() == DATA_DIR.resolve():
        zs = zero_shot(model, tokenizer, "local", batch_size=16)
        report["zero_shot"] = {"tasks": zs["tasks"], "average": zs["average"], "chance": 0.25}
    (model_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("report:", json.dumps(report["heldout"]))
    return report


# ---- command line ----------------------------------------------------------------------------

def settings_of(model: str) -> dict:
    return {**COMMON, **MODELS[model].defaults}


def main(argv=None) -> int:
    choose = argparse.ArgumentParser(add_help=False)
    choose.add_argument("--model", choices=sorted(MODELS), default="demo")
    model = choose.parse_known_args(argv)[0].model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo",
                        help="which bundled model to build: 'demo' (Qwen2-MoE) or 'fine' (DeepSeek-V2 style)")
    parser.add_argument("--source", help="the r-cran-janeaustenr .deb or its unpacked tree (default: apt-get download)")
    parser.add_argument("--out", default=str(DATA_DIR), help="data directory to (re)write (default: the checkout's moei2/data)")
    parser.add_argument("--stages", default=",".join(MODELS[model].stages),
                        help=f"comma list of {', '.join(STAGES)} (default for this --model: %(default)s)")
    for key, value in settings_of(model).items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    out = Path(args.out)
    for stage in STAGES:
        if stage in stages:
            globals()[f"stage_{stage}"](args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
