"""The moei2 command line: compress | evaluate | inspect | report | export.

The ``compress`` options are generated from the fields of :class:`moei2.CompressionConfig` and
:class:`moei2.LoRAConfig` (name, type, default and help all come from there), so every setting is
reachable and no default is written twice. Settings are layered: preset, then ``--config FILE``,
then the options given. Everything that can be checked without the weights is checked before the
model loads; a bad input ends with exit status 2 and one line on stderr.

Why one file of over 600 lines: each subcommand is a parser and a handler of a few dozen lines,
and they share the settings layering, the pre-load checks and the exit-2 error path; split across
modules, each would import the others' private helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

from .config import PRESETS, CompressionConfig, LoRAConfig, preset
from .dtypes import COMPUTE_DTYPES, dtype_name, resolve_dtype, torch_dtype



def supported_families() -> dict:
    """``{model_type: adapter class}``: the adapter registry (imported on first use, as it needs torch)."""
    from .models import FAMILIES

    return FAMILIES


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints its usage block before an error; the CLI promises one line."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ---- model facts, read from config.json before any weight is loaded -----------------------------

# What --model accepts besides a directory: the bundled models, by their moei2.demo_model name.
BUNDLED_MODELS = {"demo": "default", "demo-fine": "fine"}


def _model_dir(spec: str, option: str = "--model") -> Path:
    if spec in BUNDLED_MODELS:
        from .demo import demo_model_path

        return demo_model_path(BUNDLED_MODELS[spec])
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"{option}: {spec!r} is neither one of {', '.join(map(repr, BUNDLED_MODELS))} "
                       "nor an existing directory")
    if not path.is_dir():
        raise CLIError(f"{option}: {spec!r} is a file; give the model's directory")
    return path


def model_facts(spec: str, option: str = "--model") -> dict:
    """What the checks need from a model directory's config.json: family, hidden size, expert
    width, maximum positions, whether it is a moei2 checkpoint."""
    from .checkpoint import Checkpoint

    path = _model_dir(spec, option)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"{option}: {str(path)!r} is not a model directory (no config.json)")
    try:
        checkpoint = Checkpoint.open(path)
    except OSError as exc:
        raise CLIError(f"{option}: cannot read {config_file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CLIError(f"{option}: {exc}") from exc
    config = checkpoint.config
    try:
        adapter = checkpoint.adapter_class()
    except ValueError:
        adapter = None  # check_fit names the family
    family = adapter.family if adapter is not None else config.get("model_type")
    width = config.get(adapter.expert_width_key if adapter else "moe_intermediate_size")
    hidden = config.get("hidden_size")
    facts = {"path": path, "family": family, "adapter": adapter, "hidden_size": hidden, "expert_width": width,
             "max_positions": config.get("max_position_embeddings"), "moei2": checkpoint.is_moei2,
             "dtype": config.get("dtype") or config.get("torch_dtype"), "layers": config.get("num_hidden_layers"),
             "top_k": config.get(adapter.top_k_key if adapter else "num_experts_per_tok"),
             "experts": next((config[k] for k in (adapter.expert_count_keys if adapter else ("num_experts",))
                              if isinstance(config.get(k), int)), None)}
    if adapter is not None and not all(isinstance(v, int) and v > 0 for v in (hidden, width)):
        raise CLIError(f"{option}: {config_file} lacks a positive hidden_size or expert width")
    if adapter is not None:
        # transformers' own validation (layer_types against the layer count, ...), which would
        # otherwise first run inside the tokenizer's loading and end in a traceback.
        try:
            checkpoint.model_config()
        except ValueError as exc:
            cause = exc.__context__ or exc  # transformers' own message
            reason = [line.strip() for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
            raise CLIError(f"{option}: {config_file} is not a valid {family} configuration ({reason[-1]})") from exc
    return facts


def _load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from .calibration_data import check_tokenizer

    path = _model_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        check_tokenizer(tokenizer, "--model")
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"--model: {spec!r} has no usable tokenizer ({_first_line(exc)})") from exc
    return tokenizer


def _load_model(spec: str, dtype: str | None = None):
    """'demo' or 'demo-fine' for a bundled model, a moei2 checkpoint, or a Hugging Face model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if spec in BUNDLED_MODELS:
        from .demo import demo_model

        return demo_model(dtype=torch_dtype or torch.float32, name=BUNDLED_MODELS[spec])
    path = _model_dir(spec)
    model_facts(spec)
    from .io import is_moei2_checkpoint, load_with_tokenizer

    if is_moei2_checkpoint(path):
        # Model and tokenizer from one snapshot: a save replacing the checkpoint cannot mix them.
        model, tokenizer = load_with_tokenizer(path, dtype=torch_dtype)
        if tokenizer is None:
            raise CLIError(f"--model: {spec!r} has no tokenizer files")
        from .calibration_data import check_tokenizer

        try:
            check_tokenizer(tokenizer, "--model")
        except ValueError as exc:
            raise CLIError(f"--model: {spec!r} has no usable tokenizer ({_first_line(exc)})") from exc
        return model, tokenizer
    tokenizer = _load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    return model, tokenizer


def _read_texts(paths: list[str] | None):
    if not paths:
        from .demo import demo_texts

        return demo_texts("calibration")
    from .calibration_data import read_text_file

    try:
        return [read_text_file(p, "--calibration") for p in paths]
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


# ---- writable locations ----------------------------------------------------------------------

def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path, option: str, *, probe_bytes: int = 1 << 16) -> None:
    """Refuses, before any long work, a location that cannot be written: an existing file where a
    directory is wanted, a file among its parents, a read-only or full file system. A small probe
    file is written and removed in the nearest existing directory, because permission bits do not
    tell about read-only mounts, quotas or a full disk."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option}: {str(path)!r} is a file, not a directory")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise CLIError(f"{option}: {str(path)!r} cannot be created: {str(base)!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".moei2-probe-", dir=base)
    except OSError as exc:
        raise CLIError(f"{option}: cannot write in {str(base)!r}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * probe_bytes)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise CLIError(f"{option}: cannot write in {str(base)!r}: {reason}") from exc
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


# ---- settings: preset < --config FILE < options ------------------------------------------------

def _field_type(field) -> tuple[str, bool]:
    """(base type name, optional) of a dataclass field declared as a string annotation."""
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    optional = text.startswith("Optional[")
    if optional:
        text = text[len("Optional["):-1]
    return text, optional


def _converter(base: str, optional: bool):
    def convert(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base == "tuple":
            return tuple(t.strip() for t in text.split(",") if t.strip())
        return text
    convert.__name__ = base  # argparse names the type in its "invalid <type> value" message
    return convert


def _option_name(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _add_field_options(group, cls, prefix: str, dest_prefix: str) -> None:
    defaults = cls()
    for field in dataclasses.fields(cls):
        if field.name == "lora":
            continue
        meta = field.metadata
        default = getattr(defaults, field.name)
        base, optional = _field_type(field)
        shown = ",".join(default) if isinstance(default, tuple) else f"{default:g}" if isinstance(default, float) \
            else default
        help_text = f"{meta.get('help', '')} (default: {shown})".replace("%", "%%")
        names = [_option_name(prefix, field.name), *meta.get("cli", ())]
        dest = dest_prefix + field.name
        if base == "bool":
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
            continue
        metavar = meta.get("metavar") or ("{" + ",".join(meta["choices"]) + "}" if "choices" in meta else base.upper())
        if optional:
            metavar += "|none"
        group.add_argument(*names, dest=dest, type=_converter(base, optional), default=argparse.SUPPRESS,
                           metavar=metavar, help=help_text)


def read_config_file(path) -> dict:
    """A JSON or YAML (.yaml/.yml, needs pyyaml) mapping of CompressionConfig fields; ``lora`` may
    be a mapping of LoRAConfig fields, or null."""
    from .calibration_data import read_text_file

    path = Path(path)
    try:
        text = read_text_file(path, "--config")
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise CLIError("--config: reading YAML needs pyyaml (pip install 'moei2[yaml]'); JSON works without it") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CLIError(f"--config: {str(path)!r} is not valid YAML ({_first_line(exc)})") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"--config: {str(path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CLIError(f"--config: {str(path)!r} must hold a mapping of CompressionConfig fields")
    known = {f.name for f in dataclasses.fields(CompressionConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise CLIError(f"--config: unknown CompressionConfig fields in {str(path)!r}: {', '.join(unknown)}")
    return data


def _overlay(settings: dict, update: dict) -> None:
    """Lays one set of settings over ``settings`` (preset, then --config, then options). One that
    chooses a way of sizing the ranks (or of turning LoRA on) replaces what an earlier one chose,
    instead of conflicting with it."""
    update = dict(update)
    if update.get("avg_rank") is not None and "rank_keep_ratio" not in update:
        update["rank_keep_ratio"] = None
    if update.get("rank_keep_ratio") is not None and "avg_rank" not in update:
        update["avg_rank"] = None
    if "lora" in update and isinstance(update["lora"], LoRAConfig):
        update["lora"] = dataclasses.asdict(update["lora"])
    if isinstance(update.get("lora"), dict) and isinstance(settings.get("lora"), dict):
        update["lora"] = {**settings["lora"], **update["lora"]}
    settings.update(update)


def build_config(args, facts: dict | None = None) -> CompressionConfig:
    """The CompressionConfig of a ``compress`` command line: preset, then ``--config``, then options."""
    name = args.preset
    if name == "auto":
        name = "quick" if args.model in BUNDLED_MODELS else "defaults"
    settings: dict = {}
    if name == "paper":
        if facts is None or facts.get("family") not in supported_families():
            raise CLIError("--preset paper: the model's family is not known, so its average rank cannot be chosen")
        _overlay(settings, preset("paper", family=facts["family"], hidden_size=facts["hidden_size"],
                                expert_width=facts["expert_width"]))
    else:
        _overlay(settings, preset(name))
    if args.config:
        _overlay(settings, read_config_file(args.config))
    given = vars(args)
    options = {k[len("cfg:"):]: v for k, v in given.items() if k.startswith("cfg:")}
    lora_options = {k[len("lora:"):]: v for k, v in given.items() if k.startswith("lora:")}
    if getattr(args, "no_decompose", False):
        options.update(rank_keep_ratio=None, avg_rank=None)
    if "lora_on" in given:
        options["lora"] = {} if given["lora_on"] else None
    _overlay(settings, options)
    if lora_options:
        if settings.get("lora") is None:
            first = _option_name("lora_", next(iter(lora_options)))
            raise CLIError(f"{first}: LoRA recovery is off; add --lora (or use --preset paper)")
        _overlay(settings, {"lora": lora_options})
    try:
        return CompressionConfig.from_dict(settings)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc


def _check_device(device, dtype):
    """The device, once it exists here and computes in ``dtype``: refused before the model loads."""
    from .source import check_device

    try:
        return check_device(device, dtype)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def check_fit(config: CompressionConfig, facts: dict) -> None:
    """Refuses settings that cannot work on this model, from its config.json alone."""
    if facts["moei2"]:
        raise CLIError(f"--model: {str(facts['path'])!r} is already a moei2 checkpoint; compressing it again is "
                       "not supported: compress the original model")
    if facts["adapter"] is None:
        raise CLIError(f"--model: model_type {facts['family']!r} is not a supported MoE family "
                       f"(supported: {', '.join(supported_families())})")
    limit = facts.get("max_positions")
    if isinstance(limit, int) and config.seq_len > limit:
        raise CLIError(f"seq_len: {config.seq_len} exceeds the model's max_position_embeddings ({limit})")
    if config.lora is not None and isinstance(limit, int) and config.lora.seq_len > limit:
        raise CLIError(f"lora.seq_len: {config.lora.seq_len} exceeds the model's max_position_embeddings ({limit})")
    if config.prune_total is not None and all(isinstance(facts.get(k), int) for k in ("layers", "experts", "top_k")):
        # every layer counted as MoE: an upper bound, so nothing valid is refused
        most = facts["layers"] * max(0, facts["experts"] - facts["top_k"])
        if config.prune_total > most:
            raise CLIError(f"prune_total: {config.prune_total} is more than the model can drop ({most}: "
                           f"{facts['layers']} layers x ({facts['experts']} experts - top_k {facts['top_k']}))")
    from .pipeline import check_settings_fit

    try:  # the share a budget can remove is the same for any number of equal layers
        check_settings_fit(config, [tuple(facts.get(k) for k in ("experts", "top_k", "hidden_size", "expert_width"))])
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---- commands ----------------------------------------------------------------------------------

def run_compression(model, tokenizer, texts, config, *, output=None, overwrite=False, work_dir=None, progress=True):
    """The one call into the pipeline: ``model`` is a model in memory, or a checkpoint directory
    that is streamed from disk and written to ``output`` as its layers finish."""
    from .pipeline import compress

    if output is None:
        return compress(model, tokenizer, texts, config, work_dir=work_dir, progress=progress)
    return compress(model, tokenizer, texts, config, output=output, overwrite=overwrite, work_dir=work_dir,
                    progress=progress)


def cmd_compress(args) -> int:
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output: {args.output!r} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise CLIError(f"--output: {out} exists and is not empty (use --overwrite)")
        from .io import is_moei2_checkpoint

        if not is_moei2_checkpoint(out):
            raise CLIError(f"--output: {out} is a non-empty directory that is not a moei2 checkpoint; "
                           "--overwrite replaces only a checkpoint")
    facts = model_facts(args.model)
    config = build_config(args, facts)
    check_fit(config, facts)
    _check_device(config.device, config.dtype)
    texts = _read_texts(args.calibration)
    if config.lora is not None and config.lora.data is not None:
        from .lora import read_recovery_data

        try:
            read_recovery_data(config.lora.data)
        except (OSError, ValueError) as exc:
            raise CLIError(f"--lora-data: {_first_line(exc)}") from exc
    from .paths import check_run_paths

    try:
        check_run_paths(None if args.model in BUNDLED_MODELS else args.model, out, args.work_dir, args.report,
                        names=("--model", "--output", "--work-dir", "--report"))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    check_writable(out, "--output")
    if args.report:
        check_writable(Path(args.report).absolute().parent, "--report")
        if Path(args.report).is_dir():
            raise CLIError(f"--report: {args.report!r} is a directory")
    if args.work_dir:
        check_writable(args.work_dir, "--work-dir")

    with _library_bars(not args.quiet):
        report = _compress(args, config, texts, out)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print(summary(report))
    return 0


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """transformers' and huggingface_hub's progress bars (weight loading, ...) off for the scope
    unless ``enabled``; --quiet means no bar at all, not only ours."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        hub.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was_on[0]:
            hf_logging.enable_progress_bar()
        if not enabled and was_on[1]:
            hub.enable_progress_bars()


def _compress(args, config, texts, out) -> dict:
    from .io import save

    if args.model in BUNDLED_MODELS:
        model, tokenizer = _load_model(args.model, config.dtype)
        model, report = run_compression(model, tokenizer, texts, config, work_dir=args.work_dir,
                                        progress=not args.quiet)
        report["checkpoint"] = save(model, out, tokenizer=tokenizer, report=report, overwrite=args.overwrite)
    else:
        # A model directory is streamed: one KT block of layers in memory, the output written as
        # layers finish.
        _, report = run_compression(args.model, _load_tokenizer(args.model), texts, config, output=out,
                                    overwrite=args.overwrite, work_dir=args.work_dir, progress=not args.quiet)
    return report


def summary(report: dict) -> str:
    lines = ["moei2 compression report", f"  seed: {report['seed']}"]
    for l, info in report["layers"].items():
        kept = info.get("kept", [])
        ranks = info.get("lowrank", {}).get("ranks")
        rank_text = f" ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})" if ranks else " dense"
        lines.append(f"  layer {l:>3}: kept {len(kept):>3} experts{rank_text}")
    p = report["parameters"]
    if "budget" in report:
        lines.append(f"  budget mode: {100 * report['budget']['budget']:g}% of the routed-expert parameters to remove; "
                     "the mix per layer above")
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

    if args.model not in BUNDLED_MODELS:
        facts = model_facts(args.model, "model")
        if facts["family"] is None:
            raise CLIError(f"model: {args.model!r} has no model_type in its config.json")
    names = ev._task_names(args.tasks) if args.tasks else []
    for option, minimum in (("limit", 1), ("batch_size", 1), ("seq_len", 2), ("max_tokens", 2)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise CLIError(f"--{option.replace('_', '-')}: must be at least {minimum}, got {value}")
    documents = None
    if not args.no_perplexity and args.text:
        documents = []
        for file in args.text:
            documents += ev.read_documents(file)
    for option in ("report",):
        value = getattr(args, option)
        if value:
            check_writable(Path(value).absolute().parent, f"--{option}")
    if args.report and args.model not in BUNDLED_MODELS:
        from .paths import check_run_paths

        try:
            check_run_paths(args.model, report=args.report, names=("model", "--output", "--work-dir", "--report"))
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
    device = _check_device(args.device, args.dtype)
    model, tokenizer = _load_model(args.model, args.dtype)
    model.to(device)
    result = {}
    if names:
        result["zero_shot"] = ev.zero_shot(model, tokenizer, names, limit=args.limit, batch_size=args.batch_size)
    if not args.no_perplexity:
        from .demo import demo_texts

        texts = demo_texts("heldout") if documents is None else documents
        kwargs = {k: getattr(args, k) for k in ("seq_len", "max_tokens") if getattr(args, k) is not None}
        result["perplexity"] = ev.perplexity(model, tokenizer, texts, **kwargs)
        result["perplexity"]["source"] = "bundled held-out text" if documents is None else list(args.text)
    if args.throughput:
        result["throughput"] = ev.throughput(model, tokenizer)
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2, default=str))
    print(ev.format_result(result))
    return 0


def cmd_inspect(args) -> int:
    from .io import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        shape = info["expert_shape"]
        print(format_inspection(info, tuple(shape) if shape else None))
    return 0


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"


def format_inspection(info: dict, shape: tuple[int, int] | None) -> str:
    """The per-layer table of ``moei2 inspect``: experts kept, rank range, routed-expert
    parameters before and after, and their size in the checkpoint's dtype."""
    dtype = dtype_name(info.get("dtype", ""))
    item = torch_dtype(dtype).itemsize if dtype in COMPUTE_DTYPES else None
    lines = [f"{info['path']}", f"  {info['architecture']} ({info.get('family')}), {dtype}, "
             f"{info['experts_kept']} of {info['experts_total']} routed experts kept"]
    header = f"  {'layer':>5}  {'experts':>9}  {'ranks':>11}  {'params before':>14}  {'params after':>13}  {'size':>10}"
    lines.append(header)
    total_before = total_after = 0
    for layer, entry in sorted(info["layers"].items(), key=lambda kv: int(kv[0])):
        total = int(entry.get("num_experts") or 0)
        kept = int(entry.get("num_kept") or 0)
        ranks = entry.get("ranks")
        flat = [int(r) for triple in ranks for r in triple] if ranks else []
        rank_text = (f"{min(flat)}-{max(flat)}" if min(flat) != max(flat) else f"{flat[0]}") if flat else "full"
        if shape is not None:
            h, w = shape
            before = total * 3 * h * w
            after = sum(r * (h + w) for r in flat) if flat else kept * 3 * h * w
            total_before += before
            total_after += after
            size = _size(after * item) if item else "?"
            numbers = f"{before:>14,}  {after:>13,}  {size:>10}"
        else:
            numbers = f"{'?':>14}  {'?':>13}  {'?':>10}"
        lines.append(f"  {int(layer):>5}  {f'{kept}/{total}':>9}  {rank_text:>11}  {numbers}")
    if shape is not None and total_before:
        size = _size(total_after * item) if item else "?"
        kept_text = f"{info['experts_kept']}/{info['experts_total']}"
        lines.append(f"  {'all':>5}  {kept_text:>9}  {'':>11}  {total_before:>14,}  {total_after:>13,}  {size:>10}")
        lines.append(f"  routed expert parameters removed: {100 * (1 - total_after / total_before):.1f}%")
    files = info.get("files") or {}
    lines.append(f"  checkpoint files: {_size(sum(files.values()))} in {len(files)} files")
    return "\n".join(lines)


def cmd_report(args) -> int:
    from .plot import render_report

    if args.output:
        check_writable(args.output, "--output")
    paths = render_report(args.checkpoint, args.output)
    for p in paths:
        print(p)
    return 0


def cmd_export(args) -> int:
    from .export import export

    info = export(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"{info['path']}: {info['architecture']} with {info['num_experts']} experts per MoE layer "
          f"({', '.join(info['expert_count_keys'])} = {info['num_experts']}), loadable without moei2")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moei2", description="Compress MoE language models with MoE-I2.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model and save a moei2 checkpoint",
                       description="Settings are layered: --preset, then --config FILE, then the options "
                                   "given. Each option is a field of CompressionConfig (LoRAConfig for --lora-*); "
                                   "the defaults shown are those fields' defaults, which a preset may change.")
    c.add_argument("--model", default="demo",
                   help="'demo' (the bundled Qwen2-MoE, the default), 'demo-fine' (the bundled 64-expert "
                        "DeepSeek-V2 style model) or a model directory")
    c.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    c.add_argument("--calibration", nargs="*", help="text files for calibration (default: bundled text)")
    c.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                   help="named settings: quick (64 x 256 calibration), paper (128 x 2048, the average rank "
                        "matching the paper's expert-parameter reduction for the model's family, LoRA on), "
                        "defaults (CompressionConfig's); auto (the default) is quick for the bundled models, defaults otherwise")
    c.add_argument("--config", metavar="FILE", help="JSON or YAML mapping of CompressionConfig fields")
    c.add_argument("--no-decompose", action="store_true", help="prune only (rank_keep_ratio and avg_rank none)")
    c.add_argument("--work-dir", help="directory for resumable progress")
    c.add_argument("--report", help="write the JSON report here too")
    c.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_field_options(c.add_argument_group("compression settings (CompressionConfig fields)"),
                       CompressionConfig, "", "cfg:")
    lora = c.add_argument_group("LoRA recovery (LoRAConfig fields; used when LoRA is on)")
    lora.add_argument("--lora", dest="lora_on", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                      help="LoRA recovery after compression (needs peft); the paper preset turns it on")
    _add_field_options(lora, LoRAConfig, "lora_", "lora:")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("evaluate", help="zero-shot accuracy, perplexity, throughput")
    e.add_argument("model", help="'demo', 'demo-fine', a moei2 checkpoint or a model directory")
    e.add_argument("--tasks", default="local",
                   help="comma-separated lm-eval tasks; 'local' (bundled tasks), 'paper' (the paper's seven); "
                        "'' for none (default: local)")
    e.add_argument("--limit", type=int, help="items per task")
    e.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    e.add_argument("--text", nargs="+", metavar="FILE",
                   help="text files for perplexity, WikiText-2/PTB style: blank lines separate documents "
                        "(default: the bundled held-out text)")
    e.add_argument("--seq-len", type=int, help="perplexity window in tokens (default: 256)")
    e.add_argument("--max-tokens", type=int, help="score at most this many tokens of the text")
    e.add_argument("--no-perplexity", action="store_true")
    e.add_argument("--throughput", action="store_true", help="also measure generation tokens/s")
    e.add_argument("--dtype", choices=COMPUTE_DTYPES, help="load the model in this dtype")
    e.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the model runs (cpu, cuda, cuda:1, ...; default: cpu)")
    e.add_argument("--report", help="write the full JSON result (lm-eval's included) here")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("inspect", help="describe a moei2 checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true", help="the machine-readable summary")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("report", help="render a checkpoint's compression report as PNG figures")
    r.add_argument("checkpoint")
    r.add_argument("--output", "-o", help="directory for the figures (default: CHECKPOINT/figures)")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a uniformly pruned, dense-expert checkpoint as a plain checkpoint "
                                      "of its architecture (loads without moei2, e.g. in vLLM or SGLang)")
    x.add_argument("checkpoint", help="a moei2 checkpoint with the same expert count in every MoE layer and no "
                                      "low-rank experts (compress with --prune-rule uniform --no-decompose)")
    x.add_argument("--output", "-o", required=True, help="directory to write")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export at --output")
    x.set_defaults(func=cmd_export)
    return parser


def _first_line(exc) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename}"
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in ("compress", "evaluate", "inspect", "report", "export")), None)
    prog = f"moei2 {command}" if command else "moei2"
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help, or argparse's own exit
        return exc.code if isinstance(exc.code, int) else 0
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"{prog}: error: {_first_line(exc) if str(exc).strip() else 'out of memory'}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, EOFError) as exc:
        reason = "the disk is full: " if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"{prog}: error: {reason}{_first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
