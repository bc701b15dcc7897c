"""Optional LoRA recovery fine-tuning of a compressed model (peft), on plain text or on
instruction data in the Alpaca layout."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import LoRAConfig
from .source import as_device

# The Alpaca prompt (Taori et al. 2023), with and without an input field; the loss is taken on the
# response that follows it, not on the prompt.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
IGNORE_INDEX = -100


def alpaca_prompt(record: dict) -> str:
    """The prompt of one Alpaca record (its ``output`` is the response to learn)."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _check_records(records, source: str) -> list[dict]:
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: expected a non-empty list of Alpaca records (instruction, input, output)")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: record {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{source}: record {i} has no string {key!r}")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise ValueError(f"{source}: record {i} has a non-string 'input'")
    return records


def read_recovery_data(path) -> tuple[str, list]:
    """Reads recovery data from a local file: ``("alpaca", records)`` for ``.json`` (a list of
    records) or ``.jsonl`` (one record per line) in the Alpaca layout, ``("text", [text])``
    for any other file. Raises ValueError naming the file and the bad record."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return "alpaca", _check_records(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({exc.msg})") from None
        return "alpaca", _check_records(records, str(path))
    if not text.strip():
        raise ValueError(f"{str(path)!r} holds no text")
    return "text", [text]


def instruction_examples(tokenizer, records, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each record: prompt tokens, then response tokens and EOS, cut to
    ``seq_len``; the labels mask the prompt with -100 so that only the response is learnt. A
    record whose prompt leaves no response token within ``seq_len`` is skipped."""
    eos = getattr(tokenizer, "eos_token_id", None)
    examples = []
    for record in records:
        prompt = tokenizer(alpaca_prompt(record), add_special_tokens=False, verbose=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            response = response + [eos]
        ids = (prompt + response)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    return examples


class MasterWeights:
    """Float32 copies of the trained parameters that are stored narrower: the optimizer steps the
    copies (``parameters``) and each step is written back rounded once. Float32 parameters are
    their own masters, so a float32 model trains exactly as without this."""

    def __init__(self, params):
        import torch

        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True))
                      for p in params]
        self.parameters = [m for _, m in self.pairs]

    def gather_grads(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def scatter(self) -> None:
        import torch

        with torch.no_grad():
            for p, m in self.pairs:
                if m is not p:
                    p.copy_(m)


def lowrank_factor_parameters(model) -> list:
    """The factor parameters (``gate_A``, ``gate_B``, ...) of every low-rank expert in ``model``."""
    from .modules import LowRankExpert

    return [p for m in model.modules() if isinstance(m, LowRankExpert) for p in m.parameters()]


def lora_finetune(model, tokenizer, texts, config: LoRAConfig | None = None, *, seed: int = 0,
                  data=None, device=None) -> dict:
    """Recovery fine-tuning: LoRA adapters on ``config.target_modules`` and (with
    ``config.train_factors``) the low-rank experts' factors themselves, then (by default) merges.

    The factors are already a low-rank form of each expert, so they are trained directly rather
    than given adapters of their own; their names and shapes do not change, so the result saves
    and loads like any compressed model.

    Data: ``data`` (or ``config.data``) is a path to a ``.json``/``.jsonl`` file of Alpaca records
    (instruction, input, output: the loss is taken on the response only), a path to a plain-text
    file, or a list of Alpaca records; without it, ``texts`` (plain text, causal-LM loss on
    ``seq_len`` windows).

    device: where training runs (default: where the model is); the model is moved there for the
    training and back afterwards. The optimizer keeps float32 master copies of trained weights
    stored in bfloat16 or float16: AdamW's steps are often below a bfloat16 weight's spacing, and
    applied to the weight directly they would round away.

    The model is changed in place: with ``config.merge`` the adapters are folded into the base
    weights, so the result is a plain model of the same structure. Returns a small report: steps,
    first and last losses, what was trained, time.
    """
    import torch

    config = config or LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    data = config.data if data is None else data
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in config.target_modules if t in present]
    factors = lowrank_factor_parameters(model) if config.train_factors else []
    if not targets and not factors:
        raise ValueError(f"lora.target_modules: none of {list(config.target_modules)} exist in this model, "
                         "and it has no low-rank experts to train")

    kind, examples, windows = _training_data(tokenizer, texts, data, config, seed)
    home = next(model.parameters()).device
    device = home if device is None else as_device(device)
    batch_at = _batch_sampler(tokenizer, config, windows, examples, seed, device)
    torch.manual_seed(seed)

    previous = [(p, p.requires_grad) for p in model.parameters()]
    if device != home:
        model.to(device)
    try:
        return _train(model, config, targets, factors, batch_at, kind, examples, windows)
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)
        if device != home:
            model.to(home)


def _training_data(tokenizer, texts, data, config: LoRAConfig, seed: int):
    """``(kind, examples, windows)``: instruction examples (kind "alpaca") from ``data``, or
    ``seq_len`` token windows (kind "text") of a plain-text file or of ``texts``."""
    from .calibration_data import calibration_windows

    kind, source = "text", texts
    if isinstance(data, (str, Path)):
        kind, source = read_recovery_data(data)
    elif data is not None:
        kind, source = "alpaca", _check_records(list(data), "data")
    if kind == "text":
        return kind, None, calibration_windows(tokenizer, source, num_sequences=10**9, seq_len=config.seq_len,
                                               seed=seed)
    examples = instruction_examples(tokenizer, source, config.seq_len)
    if not examples:
        raise ValueError(f"lora.data: no record leaves a response token within lora.seq_len={config.seq_len}")
    return kind, examples, None


def _batch_sampler(tokenizer, config: LoRAConfig, windows, examples, seed: int, device):
    """``batch_at(step)``: a batch of ``config.batch_size`` windows or examples drawn with ``seed``,
    on ``device``."""
    import torch

    # Only instruction batches are padded; a plain tokenizer object need not have a pad token.
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    generator = torch.Generator().manual_seed(seed)

    def batch_at(step):
        if windows is not None:
            idx = torch.randint(0, windows.shape[0], (config.batch_size,), generator=generator)
            batch = windows[idx].to(device)
            return {"input_ids": batch, "labels": batch}
        idx = torch.randint(0, len(examples), (config.batch_size,), generator=generator).tolist()
        chosen = [examples[i] for i in idx]
        length = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), length), pad, dtype=torch.long)
        labels = torch.full((len(chosen), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), length), dtype=torch.long)
        for row, (i, l) in enumerate(chosen):
            ids[row, :len(i)] = torch.tensor(i)
            labels[row, :len(l)] = torch.tensor(l)
            mask[row, :len(i)] = 1
        return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}

    return batch_at


def _train(model, config, targets, factors, batch_at, kind, examples, windows) -> dict:
    import torch

    if targets:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("LoRA recovery needs peft: pip install 'moei2[eval]'") from exc
        trained = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                                   lora_dropout=config.dropout, target_modules=targets,
                                                   bias="none", task_type="CAUSAL_LM"))
    else:
        trained = model
        for p in model.parameters():
            p.requires_grad_(False)
    # peft freezes every base weight; the factors are switched back on after it.
    for p in factors:
        p.requires_grad_(True)
    params = [p for p in trained.parameters() if p.requires_grad]
    masters = MasterWeights(params)
    optimizer = torch.optim.AdamW(masters.parameters, lr=config.learning_rate)
    trained.train()
    losses = []
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            loss = trained(**batch_at(step)).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"LoRA loss became {loss.item()} at step {step}; lower lora.learning_rate")
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad = None
            loss.backward()
            masters.gather_grads()
            torch.nn.utils.clip_grad_norm_(masters.parameters, 1.0)
            optimizer.step()
            masters.scatter()
            losses.append(float(loss.item()))
    finally:
        trained.eval()
    if targets and config.merge:
        trained.merge_and_unload()
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": config.steps, "targets": targets, "factors_trained": len(factors),
            "factor_parameters": int(sum(p.numel() for p in factors)), "data": kind,
            "examples": len(examples) if windows is None else int(windows.shape[0]),
            "loss_first": float(np.mean(head)), "loss_last": float(np.mean(tail)), "merged": bool(targets and config.merge),
            "time": time.perf_counter() - started, "windows": 0 if windows is None else int(windows.shape[0])}
