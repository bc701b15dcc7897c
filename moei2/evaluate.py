"""Evaluation of original and compressed models: zero-shot accuracy, perplexity, generation speed.

Zero-shot accuracy goes through lm-evaluation-harness on the in-memory model, so a model fresh out
of :func:`moei2.compress` is scored exactly as it is, without a save/load round trip. The package
ships local multiple-choice tasks (``tasks="local"``) built from held-out Austen chapters; the
paper's tasks (ARC, BoolQ, HellaSwag, ...) run by name when lm-eval finds their data locally.

Importing this module registers the lm-eval model type ``moei2``, so that
``moei2-lm-eval --model moei2 --model_args pretrained=DIR ...`` evaluates moei2 checkpoints.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

TASKS_DIR = Path(__file__).resolve().parent / "data" / "tasks"
# The seven tasks the paper averages; piqa (listed by docs/method.md as an extra) runs by name.
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "rte", "winogrande")


# ---- perplexity --------------------------------------------------------------------------------

def _encode_joined(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of the texts joined by blank lines, as one stream (no special tokens)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _windows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of ``seq_len`` tokens; a last partial window is kept if it holds
    at least one prediction (two tokens)."""
    return [ids[s:s + seq_len] for s in range(0, len(ids), seq_len) if len(ids[s:s + seq_len]) >= 2]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single str (wrap it in a list)")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts: expected a non-empty sequence of strings")
    if not any(t.strip() for t in texts):
        raise ValueError("texts: all texts are empty")
    return texts


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(model, tokenizer, texts: Iterable[str], *, seq_len: int = 256, batch_size: int = 8,
               max_tokens: int | None = None, per_window: bool = False) -> dict:
    """Perplexity of a causal LM over ``texts``.

    The texts are joined by blank lines and tokenised as one stream, cut into non-overlapping
    windows of ``seq_len`` tokens (a shorter last window included), and every token after the
    first of each window is predicted from the window's preceding tokens. ``max_tokens`` truncates
    the stream first. Returns ``{"perplexity": exp(nll / tokens), "tokens": number of predicted
    tokens, "nll": summed negative log-likelihood in nats, "perplexity_stderr": its standard
    error}``; computed in float64 from the model's log-softmax.

    Tokens of one window are not independent, so the standard error treats the windows as the
    sampled units: the mean NLL per token is a ratio of window sums, its variance the ratio
    estimator's, and the perplexity's standard error follows by the delta method
    (``perplexity * stderr(mean NLL)``; NaN with a single window). ``per_window=True`` adds
    ``"window_nll"`` and ``"window_tokens"``, in stream order, so that two models scored on the
    same texts can be compared window by window (a paired difference has a far smaller error).
    """
    texts = _check_texts(texts)
    seq_len = _positive_int("seq_len", seq_len, 2)
    batch_size = _positive_int("batch_size", batch_size)
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len: {seq_len} exceeds the model's max_position_embeddings ({max_positions})")
    ids = _encode_joined(tokenizer, texts)
    if max_tokens is not None:
        ids = ids[:_positive_int("max_tokens", max_tokens, 2)]
    windows = _windows(ids, seq_len)
    if not windows:
        raise ValueError("texts: fewer than two tokens to score")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    window_nll, window_tokens = [], []
    try:
        with torch.no_grad():
            # Full windows are batched; the partial last one (if any) goes alone.
            full = [w for w in windows if len(w) == seq_len]
            groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
            groups += [[w] for w in windows if len(w) != seq_len]
            for group in groups:
                batch = torch.as_tensor(np.stack(group), device=device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].double()
                logp = torch.log_softmax(logits, dim=-1)
                window_nll += (-logp.gather(-1, batch[:, 1:, None])).sum(dim=(1, 2)).tolist()
                window_tokens += [batch.shape[1] - 1] * batch.shape[0]
    finally:
        model.train(was_training)
    nll, count = math.fsum(window_nll), sum(window_tokens)
    result = {"perplexity": math.exp(nll / count), "tokens": count, "nll": nll,
              "perplexity_stderr": math.exp(nll / count) * _ratio_stderr(window_nll, window_tokens)}
    if per_window:
        result.update(window_nll=window_nll, window_tokens=window_tokens)
    return result


def _ratio_stderr(sums, counts) -> float:
    """Standard error of ``sum(sums) / sum(counts)`` with the (sum, count) pairs as the sampled units
    (the ratio estimator's linearised variance); NaN for fewer than two units."""
    n = len(sums)
    if n < 2:
        return float("nan")
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    ratio = sums.sum() / counts.sum()
    residual = sums - ratio * counts
    return float(np.sqrt(n / (n - 1) * np.sum(residual ** 2)) / counts.sum())


def read_documents(path) -> list[str]:
    """The documents of a local text file in the WikiText-2 / PTB style: blocks separated by one or
    more blank lines, each block one document (surrounding whitespace stripped, empty blocks
    dropped). :func:`perplexity` joins them again with blank lines."""
    import re

    from .calibration_data import read_text_file

    path = Path(path)
    text = read_text_file(path, "text")
    documents = [block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))]
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError(f"text: {str(path)!r} holds no text")
    return documents


# ---- throughput --------------------------------------------------------------------------------

def throughput(model, tokenizer, *, prompt_len: int = 32, new_tokens: int = 64, batch_size: int = 1,
               repeats: int = 3, texts: Sequence[str] | None = None) -> dict:
    """Greedy generation speed: ``new_tokens`` tokens after a ``prompt_len``-token prompt.

    Prompts are cut from ``texts`` (default: the bundled held-out text). One untimed warm-up run
    precedes ``repeats`` timed runs; EOS does not stop generation, so every run produces exactly
    ``new_tokens`` tokens per sequence. Returns ``tokens_per_s`` (median over runs of generated
    tokens / second, all sequences counted), ``seconds`` (each run), ``prefill_tokens``,
    ``new_tokens``, ``batch_size`` and ``threads``.
    """
    prompt_len = _positive_int("prompt_len", prompt_len)
    new_tokens = _positive_int("new_tokens", new_tokens)
    batch_size = _positive_int("batch_size", batch_size)
    repeats = _positive_int("repeats", repeats)
    if texts is None:
        from .demo import demo_texts

        texts = demo_texts("heldout")
    ids = _encode_joined(tokenizer, _check_texts(texts))
    if len(ids) < prompt_len * batch_size:
        raise ValueError(f"texts: {len(ids)} tokens, fewer than prompt_len * batch_size = {prompt_len * batch_size}")
    device = _model_device(model)
    prompts = torch.as_tensor(ids[:prompt_len * batch_size].reshape(batch_size, prompt_len), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(prompts),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    seconds = []
    try:
        with torch.no_grad():
            model.generate(prompts, **kwargs)  # warm-up: allocations, kernel selection
            for _ in range(repeats):
                start = time.perf_counter()
                out = model.generate(prompts, **kwargs)
                seconds.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    produced = (out.shape[1] - prompt_len) * batch_size
    return {"tokens_per_s": produced / float(np.median(seconds)), "seconds": seconds,
            "prefill_tokens": prompt_len * batch_size, "new_tokens": produced, "batch_size": batch_size,
            "threads": torch.get_num_threads()}


# ---- zero-shot with lm-evaluation-harness -------------------------------------------------------

def local_tasks() -> list[str]:
    """Names of the multiple-choice tasks shipped with the package (``tasks="local"``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def local_task_dataset(task_file: str, **_metadata):
    """lm-eval ``custom_dataset`` loader of the shipped task YAMLs: reads ``data/tasks/<task_file>``
    (JSON lines with ``context``, ``choices``, ``label``) into a ``DatasetDict`` with a ``test`` split."""
    import json

    import datasets

    path = TASKS_DIR / task_file
    if path.parent != TASKS_DIR or not path.is_file():
        raise ValueError(f"task_file: {task_file!r} is not a file in {TASKS_DIR}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _task_names(tasks) -> list[str]:
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    elif isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks):
        names = [t.strip() for t in tasks]
    else:
        raise TypeError(f"tasks: expected 'local', 'paper', a task name, a comma-separated string or a list of names, "
                        f"got {tasks!r}")
    expanded = []
    for name in names:
        group = local_tasks() if name == "local" else list(PAPER_TASKS) if name == "paper" else [name]
        for n in group:
            if n not in expanded:
                expanded.append(n)
    if not expanded:
        raise ValueError("tasks: no task given")
    return expanded


def _load_task_dict(names: list[str]):
    """Resolves task names with a TaskManager over the shipped tasks (plus lm-eval's own when a
    non-local name is asked for) and loads their data, turning a missing dataset into ValueError."""
    from lm_eval.tasks import TaskManager

    local = set(local_tasks())
    needs_defaults = any(n not in local for n in names)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_defaults)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {unknown}; the local tasks are {sorted(local)}, "
                         f"the paper's are {list(PAPER_TASKS)}")
    task_dict = {}
    for name in names:
        try:
            task_dict.update(manager.load([name])["tasks"])
        except Exception as exc:  # lm-eval/datasets raise many types for a missing download
            if name in local:
                raise
            raise ValueError(
                f"tasks: the dataset of {name!r} is not available offline ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Put it in the Hugging Face datasets "
                f"cache first, or use tasks='local' for the bundled tasks {sorted(local)}") from exc
    return task_dict, manager


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    device = _model_device(model)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                max_length=getattr(model.config, "max_position_embeddings", None))


def zero_shot(model, tokenizer, tasks="local", *, limit: int | float | None = None, batch_size: int = 8,
              num_fewshot: int = 0) -> dict:
    """Zero-shot (or few-shot) multiple-choice accuracy with lm-evaluation-harness.

    ``tasks``: ``"local"`` (the bundled Austen tasks, see :func:`local_tasks`), ``"paper"`` (the
    paper's seven: ``arc_challenge, arc_easy, boolq, hellaswag, openbookqa, rte, winogrande``; their
    data must be available locally), any lm-eval task name (``piqa``, ...), a comma-separated string
    or a list of these. ``limit`` caps the items per task (an int, or a fraction in (0, 1)).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}},
    "average": mean acc over the tasks, "raw": lm-eval's results dict}``.
    """
    import lm_eval

    names = _task_names(tasks)
    batch_size = _positive_int("batch_size", batch_size)
    num_fewshot = _positive_int("num_fewshot", num_fewshot, 0)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ValueError(f"limit: expected a positive int or a fraction in (0, 1), got {limit!r}")
        if isinstance(limit, float) and limit >= 1:
            raise ValueError(f"limit: a float limit is a fraction and must be < 1, got {limit}")
    task_dict, manager = _load_task_dict(names)
    lm = _hflm(model, tokenizer, batch_size)
    was_training = model.training
    model.eval()
    try:
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(task_dict.values()), task_manager=manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=False,
                                      bootstrap_iters=1000, verbosity="WARNING")
    finally:
        model.train(was_training)
    results = {}
    for name in task_dict:  # leaf tasks: a group or tag name has been expanded
        r = raw["results"][name]
        results[name] = {"acc": float(r["acc,none"]), "acc_stderr": _float_or_none(r.get("acc_stderr,none")),
                         "acc_norm": _float_or_none(r.get("acc_norm,none")),
                         "acc_norm_stderr": _float_or_none(r.get("acc_norm_stderr,none")),
                         "samples": int(raw["n-samples"][name]["effective"])}
    average = float(np.mean([r["acc"] for r in results.values()]))
    return {"tasks": results, "average": average, "raw": raw}


def _float_or_none(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ---- the lm-eval model type "moei2" ------------------------------------------------------------

def load_for_eval(path, dtype=None):
    """Loads a moei2 checkpoint (via ``moei2.io.load``) or a plain Hugging Face model directory,
    with its tokenizer: returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .dtypes import resolve_dtype

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"pretrained: {str(path)!r} is not a directory")
    dtype = None if dtype == "auto" else resolve_dtype(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        from .io import is_moei2_checkpoint, load
    except ImportError:  # moei2.io not present in this build: only plain HF directories load
        is_moei2_checkpoint = None
    if is_moei2_checkpoint is not None and is_moei2_checkpoint(path):
        model = load(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval(), tokenizer


def _register_lm_eval_model():
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM

    class MoEI2LM(HFLM):
        """lm-eval model type ``moei2``: ``pretrained=DIR`` is a moei2 checkpoint (compressed
        experts restored by ``moei2.io.load``) or a plain Hugging Face model directory; every other
        model argument is HFLM's (``batch_size``, ``max_length``, ``device``, ``dtype``)."""

        def __init__(self, pretrained, tokenizer=None, dtype="auto", device=None, **kwargs):
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if isinstance(pretrained, (str, Path)):
                model, loaded_tokenizer = load_for_eval(pretrained, dtype=dtype)
                tokenizer = tokenizer or loaded_tokenizer
                model = model.to(device)
            else:
                model = pretrained
            kwargs.setdefault("max_length", getattr(model.config, "max_position_embeddings", None))
            super().__init__(pretrained=model, tokenizer=tokenizer, device=device, **kwargs)

    MoEI2LM.__module__ = __name__
    MoEI2LM.__qualname__ = "MoEI2LM"
    if "moei2" in model_registry and model_registry.get("moei2").__module__ == __name__:
        return model_registry.get("moei2")
    register_model("moei2")(MoEI2LM)
    return MoEI2LM


try:
    MoEI2LM = _register_lm_eval_model()
except ImportError:  # lm-eval is optional (the "eval" extra); perplexity and throughput work without it
    MoEI2LM = None


def lm_eval_main(argv: Sequence[str] | None = None) -> int:
    """``moei2-lm-eval``: lm-eval's command line with the ``moei2`` model type registered.

    lm-eval 0.4.13 finds model types only among its own modules (it reads no plugin entry
    points), so this wrapper imports moei2 first. The bundled tasks are added to
    ``--include_path`` unless one is given, so ``--tasks austen_cloze`` works out of the box.
    """
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    helping = not args or args == ["run"] or any(a in ("-h", "--help") for a in args)
    if not helping and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]  # run, ls and validate all take it
    old = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0


# ---- the table printed by `moei2 evaluate` -----------------------------------------------------

def format_result(result: dict) -> str:
    """A compact table of a result of ``moei2 evaluate``: per task acc, its standard error and the
    items scored, the average; perplexity and tokens; tokens/s when measured."""
    lines = []
    zero_shot = result.get("zero_shot")
    if zero_shot:
        width = max(12, *(len(name) for name in zero_shot["tasks"]))
        lines.append(f"{'task':<{width}}  {'acc':>6}  {'stderr':>6}  {'items':>6}")
        for name, r in zero_shot["tasks"].items():
            stderr = f"{r['acc_stderr']:.4f}" if r.get("acc_stderr") is not None else "-"
            lines.append(f"{name:<{width}}  {r['acc']:>6.4f}  {stderr:>6}  {r['samples']:>6}")
        lines.append(f"{'average':<{width}}  {zero_shot['average']:>6.4f}")
    ppl = result.get("perplexity")
    if ppl:
        if lines:
            lines.append("")
        stderr = ppl.get("perplexity_stderr")
        spread = f" ± {stderr:.3f}" if stderr is not None and math.isfinite(stderr) else ""
        lines.append(f"perplexity  {ppl['perplexity']:.3f}{spread} over {ppl['tokens']:,} tokens")
    speed = result.get("throughput")
    if speed:
        lines.append(f"throughput  {speed['tokens_per_s']:.1f} tokens/s (batch {speed['batch_size']}, "
                     f"{speed['threads']} threads)")
    return "\n".join(lines)
