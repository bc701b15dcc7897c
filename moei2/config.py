"""CompressionConfig: every knob of the MoE-I2 pipeline, validated, with method.md's defaults."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Optional

from .dtypes import COMPUTE_DTYPES

PRUNE_RULES = ("inverse", "uniform")
SELECTIONS = ("genetic", "greedy", "frequency", "reap", "random")
RANK_RULES = ("importance", "uniform")
KERNELS = ("auto", "c", "torch")
HIDDEN_STATES = ("compressed", "original")


# Upper bounds on the search sizes: beyond them the genetic search's memory or the KT walk's
# K^T decoder passes would run for days or exhaust memory, so a typo is refused up front.
MAX_POPULATION = 100_000
MAX_GENERATIONS = 100_000
MAX_KT_COMBINATIONS = 10_000
MAX_SEED = 2**64 - 1  # the C search takes a uint64 seed
DTYPES = (None, *COMPUTE_DTYPES)
_DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu|npu|hpu)(:[0-9]+)?)$")


def _field(default, help: str, **extra):
    """A dataclass field whose ``help`` (and optional ``choices``, ``cli`` aliases) the command
    line reads, so each setting is documented in exactly one place."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclass
class LoRAConfig:
    """LoRA recovery fine-tuning after compression (needs the ``eval`` extra: peft)."""

    rank: int = _field(8, "LoRA rank of the adapters")
    alpha: float = _field(16.0, "LoRA scaling alpha")
    dropout: float = _field(0.05, "dropout on the adapters' input, in [0, 1)")
    learning_rate: float = _field(2e-4, "AdamW learning rate")
    steps: int = _field(100, "optimizer steps")
    batch_size: int = _field(4, "sequences per step")
    seq_len: int = _field(256, "tokens per training sequence (instruction examples are cut to it)")
    target_modules: tuple = _field(("q_proj", "k_proj", "v_proj", "o_proj"),
                                   "module names that get LoRA adapters (comma-separated on the command line)",
                                   metavar="NAMES")
    train_factors: bool = _field(True, "also train the low-rank experts' factors themselves")
    data: Optional[str] = _field(None, "recovery data: a .json/.jsonl file of Alpaca records (instruction, input, "
                                       "output; loss on the response) or a plain-text file; none: the "
                                       "calibration texts", metavar="FILE")
    merge: bool = _field(True, "fold the adapters into the weights after training")

    def __post_init__(self):
        _positive_int(self, "rank", "steps", "batch_size", "seq_len")
        _positive_float(self, "alpha", "learning_rate")
        _number(self, "dropout", 0.0, 1.0, high_open=True)
        _bools(self, "train_factors", "merge")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"lora.target_modules must be a non-empty sequence of module names, got {targets!r}")
        self.target_modules = tuple(targets)
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ValueError(f"lora.data must be a file path (str) or None, got {self.data!r}")


@dataclass
class CompressionConfig:
    """Settings of :func:`moei2.compress`. Defaults follow docs/method.md.

    Calibration
        num_sequences, seq_len: calibration windows cut from the given texts (128 x 2048 in the
        paper; small models need far less). calib_batch_size: sequences per forward pass.
    Inter-expert pruning
        prune_ratio: fraction P of all routed experts to drop (global budget round(P * E * L)),
        or prune_total to give the count directly; 0 disables pruning. prune_rule: per-layer
        allocation, "inverse" (share proportional to 1/layer importance) or "uniform".
        population, generations, elite_fraction, mutation_rate: the layer-wise genetic search.
        kt_candidates (K) and kt_block (T): the block-wise KT-reception field; kt_block=1 or
        kt_candidates=1 skips it. selection: how experts are chosen, "genetic" (the method),
        or the baselines "greedy" (drop the cheapest expert one at a time), "frequency" (drop
        the least routed), "reap" (drop the lowest REAP saliency: mean router-weighted output norm,
        arXiv 2510.13999) and "random". search_hidden: the hidden state the search and the KT
        step see, "compressed" (propagated through the layers already compressed) or "original"
        (the unmodified model's); the Grams always see the compressed one (docs/method.md).
    Intra-expert decomposition
        rank_keep_ratio: fraction of the surviving experts' parameters kept by low-rank factors
        (None disables decomposition), or avg_rank to give R_avg directly. alpha, eps: the rank
        allocation exponent and offset. importance_on_pruned: recompute expert importance on the
        pruned model before allocating ranks (else reuse the pre-pruning importance).
        rank_rule: "importance" (the method) or "uniform" (every expert gets R_avg).
        whiten: truncation-aware factors from the calibration Grams (the method); False gives a
        plain truncated SVD of each weight.
    Budget mode
        budget: the fraction of routed-expert parameters to remove; moei2 then chooses, jointly over
        the layers, how many experts each drops and the rank of every survivor (or keeps them
        dense) to minimise the summed error of the layers' outputs (docs/method.md, "Budget
        mode"). It replaces prune_ratio, prune_total, rank_keep_ratio and avg_rank, which must
        keep their defaults; prune_rule, rank_rule, alpha, eps and importance_on_pruned are unused.
        budget_max_prune: the most a layer may drop, as a fraction of its experts.
    Other
        seed: every random choice (calibration sampling, genetic search). device, dtype: where
        calibration and the block step run. kernels: "c" (the C core on the host), "torch"
        (torch on ``device``) or "auto" (C on the CPU, torch elsewhere) for the candidate outputs,
        Grams and factors. lora: optional LoRA recovery.

    Every field is checked on construction; a bad value raises ValueError or TypeError naming it.
    """

    num_sequences: int = _field(128, "calibration sequences")
    seq_len: int = _field(2048, "tokens per calibration sequence")
    calib_batch_size: int = _field(8, "calibration sequences per forward pass", cli=("--batch-size",))
    seed: int = _field(42, "seed of every random choice (calibration sampling, search)")

    prune_ratio: float = _field(0.25, "fraction of all routed experts to drop, in [0, 1)")
    prune_total: Optional[int] = _field(None, "number of routed experts to drop in total (overrides prune_ratio)")
    prune_rule: str = _field("inverse", "per-layer prune counts: inverse layer importance or uniform",
                             choices=PRUNE_RULES)
    population: int = _field(100, f"genetic search population (2 to {MAX_POPULATION:,})")
    generations: int = _field(50, f"genetic search generations (1 to {MAX_GENERATIONS:,})")
    elite_fraction: float = _field(0.2, "fraction of each generation kept as parents, in (0, 1]")
    mutation_rate: float = _field(0.3, "per-slot mutation probability, in [0, 1]")
    kt_candidates: int = _field(3, "K: candidate expert sets kept per layer for the block step")
    kt_block: int = _field(3, f"T: consecutive MoE layers searched jointly (K**T at most {MAX_KT_COMBINATIONS:,})")
    selection: str = _field("genetic", "expert selection: the method (genetic) or a baseline", choices=SELECTIONS)
    search_hidden: str = _field("compressed", "hidden state the search and the KT step see: compressed (through the "
                                              "layers already compressed) or original (the unmodified model's)",
                                choices=HIDDEN_STATES)

    rank_keep_ratio: Optional[float] = _field(2.0 / 3.0, "fraction of the surviving experts' parameters the "
                                                         "low-rank factors keep, in (0, 1]")
    avg_rank: Optional[float] = _field(None, "average rank R_avg of the low-rank experts (instead of rank_keep_ratio)")
    alpha: float = _field(0.15, "rank allocation exponent on expert importance")
    eps: float = _field(1e-8, "rank allocation offset added to expert importance")
    importance_on_pruned: bool = _field(True, "recompute expert importance on the pruned model before ranking")
    rank_rule: str = _field("importance", "rank allocation: by importance (the method) or uniform", choices=RANK_RULES)
    whiten: bool = _field(True, "truncation-aware (whitened) factors; off gives a plain truncated SVD")

    budget: Optional[float] = _field(None, "budget mode: fraction of the routed-expert parameters to remove, in "
                                           "(0, 1); moei2 chooses each layer's dropped experts and ranks (instead "
                                           "of prune_ratio, prune_total, rank_keep_ratio and avg_rank)")
    budget_max_prune: float = _field(0.5, "budget mode: the largest fraction of a layer's experts it may drop, in "
                                          "[0, 1] (at most num_experts - top_k)")

    device: str = _field("cpu", "where calibration and the block step run (cpu, cuda, cuda:1, ...)",
                         metavar="DEVICE")
    dtype: Optional[str] = _field(None, "dtype the model is loaded in; none keeps the checkpoint's",
                                  choices=DTYPES[1:])
    kernels: str = _field("auto", "how the heavy stages compute: c, the C core on the host; torch, torch on "
                                  "the device (candidate outputs, Grams, factors: what an accelerator runs; on cpu "
                                  "it checks that path against the C core); auto, c on cpu and torch elsewhere",
                          choices=KERNELS)
    lora: Optional[LoRAConfig] = _field(None, "LoRA recovery after compression (a LoRAConfig, or None)")

    def __post_init__(self):
        _positive_int(self, "num_sequences", "seq_len", "calib_batch_size", "population", "generations",
                      "kt_candidates", "kt_block")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}")
        _number(self, "prune_ratio", 0.0, 1.0, high_open=True)
        if self.prune_total is not None:
            if not isinstance(self.prune_total, int) or isinstance(self.prune_total, bool) or self.prune_total < 0:
                raise ValueError(f"prune_total must be a non-negative integer or None, got {self.prune_total!r}")
        _choice(self, "prune_rule", PRUNE_RULES)
        _choice(self, "selection", SELECTIONS)
        _choice(self, "search_hidden", HIDDEN_STATES)
        _choice(self, "rank_rule", RANK_RULES)
        _number(self, "elite_fraction", 0.0, 1.0, low_open=True)
        _number(self, "mutation_rate", 0.0, 1.0)
        if not 2 <= self.population <= MAX_POPULATION:
            raise ValueError(f"population must be in [2, {MAX_POPULATION:,}], got {self.population}")
        if self.generations > MAX_GENERATIONS:
            raise ValueError(f"generations must be in [1, {MAX_GENERATIONS:,}], got {self.generations}")
        if self.kt_candidates > MAX_KT_COMBINATIONS or self.kt_candidates ** min(self.kt_block, 64) > MAX_KT_COMBINATIONS:
            raise ValueError(f"kt_candidates ** kt_block must be at most {MAX_KT_COMBINATIONS:,} combinations per "
                             f"block, got {self.kt_candidates} ** {self.kt_block}")
        if self.rank_keep_ratio is not None and self.avg_rank is not None:
            raise ValueError("give at most one of rank_keep_ratio and avg_rank")
        if self.rank_keep_ratio is not None:
            _number(self, "rank_keep_ratio", 0.0, 1.0, low_open=True, none_ok=True)
        if self.avg_rank is not None:
            _number(self, "avg_rank", 1.0, math.inf, high_open=True, none_ok=True)
        _number(self, "budget_max_prune", 0.0, 1.0)
        if self.budget is not None:
            _number(self, "budget", 0.0, 1.0, low_open=True, high_open=True, none_ok=True)
            sized = [name for name in _BUDGET_REPLACES
                     if getattr(self, name) != self.__dataclass_fields__[name].default]
            if sized:
                raise ValueError(f"budget replaces {', '.join(_BUDGET_REPLACES)}; give budget alone, not with "
                                 f"{', '.join(f'{n}={getattr(self, n)!r}' for n in sized)}")
        _number(self, "alpha", 0.0, math.inf, high_open=True)
        _number(self, "eps", 0.0, math.inf, low_open=True, high_open=True)
        _bools(self, "importance_on_pruned", "whiten")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps', ..., got {self.device!r}")
        _choice(self, "kernels", KERNELS)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be None, float32, float64, bfloat16 or float16, got {self.dtype!r}")
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        if self.lora is not None and not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(self.lora).__name__}")

    @property
    def prunes(self) -> bool:
        """Whether experts may be dropped (in budget mode the allocator decides how many)."""
        return self.budget is not None or (self.prune_total or 0) > 0 or (self.prune_total is None and
                                                                          self.prune_ratio > 0)

    def torch_kernels(self, device=None) -> bool:
        """True when the heavy stages compute in torch on ``device`` (a torch.device or its name;
        the config's ``device`` by default), see ``kernels``."""
        kind = str(self.device if device is None else device).split(":")[0]
        return self.kernels == "torch" or (self.kernels == "auto" and kind != "cpu")

    @property
    def decomposes(self) -> bool:
        """Whether experts may be made low-rank (in budget mode the allocator decides which layers)."""
        return self.budget is not None or self.rank_keep_ratio is not None or self.avg_rank is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a CompressionConfig needs a mapping of its fields, got {type(data).__name__}")
        _known(cls, data, "")
        data = dict(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = LoRAConfig.from_dict(data["lora"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Hash of the settings that determine the result (used to refuse resuming a different run)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The fields budget mode chooses itself: given with budget they must keep their defaults.
_BUDGET_REPLACES = ("prune_ratio", "prune_total", "rank_keep_ratio", "avg_rank")


def _lora_from_dict(cls, data: dict) -> "LoRAConfig":
    if not isinstance(data, dict):
        raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(data).__name__}")
    _known(cls, data, "lora.")
    return cls(**data)


LoRAConfig.from_dict = classmethod(_lora_from_dict)


def _known(cls, data: dict, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(prefix + u for u in unknown)}")


def _prefix(obj) -> str:
    return "lora." if isinstance(obj, LoRAConfig) else ""


def _positive_int(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{_prefix(obj)}{name} must be a positive integer, got {value!r}")


def _positive_float(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{_prefix(obj)}{name} must be a positive number, got {value!r}")


def _number(obj, name, low, high, *, low_open=False, high_open=False, none_ok=False):
    """A finite real number within [low, high] (either end open); bools are refused because
    ``True`` would silently read as 1."""
    value = getattr(obj, name)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        extra = " or None" if none_ok else ""
        raise ValueError(f"{_prefix(obj)}{name} must be a finite number in {interval}{extra}, got {value!r}")


def _bools(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise TypeError(f"{_prefix(obj)}{name} must be True or False, got {value!r}")


def _choice(obj, name, choices):
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{_prefix(obj)}{name} must be one of {choices}, got {value!r}")


# ---- named settings --------------------------------------------------------------------------

PRESETS = ("quick", "paper", "defaults")

# Expert-parameter reduction reported for the full method (docs/method.md, "Reported results"):
# Mixtral-8x7B about 50 %, DeepSeek-V2-Lite 53.98 %, both with 25 % of the experts pruned.
# A family without a reported figure takes Mixtral's.
PAPER_EXPERT_REDUCTION = {"mixtral": 0.50, "deepseek_v2": 0.5398}
PAPER_DEFAULT_REDUCTION = 0.50


def full_rank(hidden_size: int, expert_width: int) -> int:
    """The largest rank at which the factors of an expert matrix are smaller than the matrix:
    floor(m n / (m + n)), the clamp of docs/method.md."""
    return (hidden_size * expert_width) // (hidden_size + expert_width)


def check_rank_budget(config: "CompressionConfig", hidden_size: int, expert_width: int) -> None:
    """Refuses a rank budget that experts of this size cannot take, before any work: an
    ``avg_rank`` above the full rank (nothing would be saved) or a ``rank_keep_ratio`` giving an
    average rank below 1. ValueError naming the setting."""
    top = full_rank(hidden_size, expert_width)
    if config.avg_rank is not None and config.avg_rank > top:
        raise ValueError(f"avg_rank: {config.avg_rank:g} is above the experts' full rank {top} "
                         f"(hidden {hidden_size} x width {expert_width}): nothing would be saved")
    if config.rank_keep_ratio is not None:
        average = config.rank_keep_ratio * hidden_size * expert_width / (hidden_size + expert_width)
        if average < 1:
            raise ValueError(f"rank_keep_ratio: {config.rank_keep_ratio:g} gives an average rank of {average:.3g} on "
                             f"experts of hidden {hidden_size} x width {expert_width}; the least rank is 1")


def paper_avg_rank(family: str, hidden_size: int, expert_width: int, prune_ratio: float = 0.25) -> int:
    """The average rank that, after pruning ``prune_ratio`` of the experts, removes the paper's
    share of routed-expert parameters: the survivors keep (1 - reduction) / (1 - prune_ratio) of
    their parameters, and a rank-r factor pair keeps r (m + n) / (m n) of a matrix."""
    reduction = PAPER_EXPERT_REDUCTION.get(family, PAPER_DEFAULT_REDUCTION)
    keep = (1.0 - reduction) / (1.0 - prune_ratio)
    exact = hidden_size * expert_width / (hidden_size + expert_width)
    return max(1, round(keep * exact))


def preset(name: str, *, family: Optional[str] = None, hidden_size: Optional[int] = None,
           expert_width: Optional[int] = None) -> dict:
    """The fields a named preset sets (a partial CompressionConfig as a dict).

    ``quick``: a small calibration (64 x 256) for the bundled demo model and first trials.
    ``paper``: the paper's protocol: 128 x 2048 calibration, 25 % of experts pruned, the average
    rank that matches the paper's expert-parameter reduction for the model's family (needs
    ``family``, ``hidden_size`` and ``expert_width``; see :func:`paper_avg_rank`), LoRA on.
    ``defaults``: nothing, i.e. CompressionConfig's own defaults.
    """
    if name == "defaults":
        return {}
    if name == "quick":
        return {"num_sequences": 64, "seq_len": 256}
    if name == "paper":
        if family is None or hidden_size is None or expert_width is None:
            raise ValueError("preset 'paper' needs the model's family, hidden size and expert width")
        return {"num_sequences": 128, "seq_len": 2048, "prune_ratio": 0.25, "rank_keep_ratio": None,
                "avg_rank": paper_avg_rank(family, hidden_size, expert_width, 0.25), "lora": {}}
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
