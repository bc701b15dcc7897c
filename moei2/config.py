"""CompressionConfig: every knob of the MoE-I2 pipeline, validated, with method.md's defaults."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

PRUNE_RULES = ("inverse", "uniform")
SELECTIONS = ("genetic", "greedy", "frequency", "random")
RANK_RULES = ("importance", "uniform")


@dataclass
class LoRAConfig:
    """LoRA recovery fine-tuning after compression (needs the ``eval`` extra: peft)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    learning_rate: float = 2e-4
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge: bool = True

    def __post_init__(self):
        _positive_int(self, "rank", "steps", "batch_size", "seq_len")
        _positive_float(self, "alpha", "learning_rate")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("lora.target_modules must be a non-empty sequence of module names")
        self.target_modules = tuple(self.target_modules)


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
        the least routed) and "random".
    Intra-expert decomposition
        rank_keep_ratio: fraction of the surviving experts' parameters kept by low-rank factors
        (None disables decomposition), or avg_rank to give R_avg directly. alpha, eps: the rank
        allocation exponent and offset. importance_on_pruned: recompute expert importance on the
        pruned model before allocating ranks (else reuse the pre-pruning importance).
        rank_rule: "importance" (the method) or "uniform" (every expert gets R_avg).
        whiten: truncation-aware factors from the calibration Grams (the method); False gives a
        plain truncated SVD of each weight.
    Other
        seed: every random choice (calibration sampling, genetic search). device, dtype: where
        calibration and the block step run. lora: optional LoRA recovery.
    """

    num_sequences: int = 128
    seq_len: int = 2048
    calib_batch_size: int = 8
    seed: int = 42

    prune_ratio: float = 0.25
    prune_total: Optional[int] = None
    prune_rule: str = "inverse"
    population: int = 100
    generations: int = 50
    elite_fraction: float = 0.2
    mutation_rate: float = 0.3
    kt_candidates: int = 3
    kt_block: int = 3
    selection: str = "genetic"

    rank_keep_ratio: Optional[float] = 2.0 / 3.0
    avg_rank: Optional[float] = None
    alpha: float = 0.15
    eps: float = 1e-8
    importance_on_pruned: bool = True
    rank_rule: str = "importance"
    whiten: bool = True

    device: str = "cpu"
    dtype: Optional[str] = None
    lora: Optional[LoRAConfig] = None

    def __post_init__(self):
        _positive_int(self, "num_sequences", "seq_len", "calib_batch_size", "population", "generations",
                      "kt_candidates", "kt_block")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.prune_ratio, (int, float)) and 0.0 <= self.prune_ratio < 1.0):
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio!r}")
        if self.prune_total is not None:
            if not isinstance(self.prune_total, int) or self.prune_total < 0:
                raise ValueError(f"prune_total must be a non-negative integer or None, got {self.prune_total!r}")
        if self.prune_rule not in PRUNE_RULES:
            raise ValueError(f"prune_rule must be one of {PRUNE_RULES}, got {self.prune_rule!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.rank_rule not in RANK_RULES:
            raise ValueError(f"rank_rule must be one of {RANK_RULES}, got {self.rank_rule!r}")
        if not 0.0 < self.elite_fraction <= 1.0:
            raise ValueError(f"elite_fraction must be in (0, 1], got {self.elite_fraction!r}")
        if not 0.0 <= self.mutation_rate <= 1.0:
            raise ValueError(f"mutation_rate must be in [0, 1], got {self.mutation_rate!r}")
        if self.population < 2:
            raise ValueError(f"population must be at least 2, got {self.population}")
        if self.rank_keep_ratio is not None and self.avg_rank is not None:
            raise ValueError("give at most one of rank_keep_ratio and avg_rank")
        if self.rank_keep_ratio is not None and not 0.0 < self.rank_keep_ratio <= 1.0:
            raise ValueError(f"rank_keep_ratio must be in (0, 1] or None, got {self.rank_keep_ratio!r}")
        if self.avg_rank is not None and not (isinstance(self.avg_rank, (int, float)) and self.avg_rank >= 1):
            raise ValueError(f"avg_rank must be >= 1 or None, got {self.avg_rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a finite non-negative number, got {self.alpha!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if self.dtype not in (None, "float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"dtype must be None, float32, float64, bfloat16 or float16, got {self.dtype!r}")
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        if self.lora is not None and not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig, a dict or None, got {type(self.lora).__name__}")

    @property
    def prunes(self) -> bool:
        return (self.prune_total or 0) > 0 or (self.prune_total is None and self.prune_ratio > 0)

    @property
    def decomposes(self) -> bool:
        return self.rank_keep_ratio is not None or self.avg_rank is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields: {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = LoRAConfig(**data["lora"])
        return cls(**data)

    def fingerprint(self) -> str:
        """Hash of the settings that determine the result (used to refuse resuming a different run)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _positive_int(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            prefix = "lora." if isinstance(obj, LoRAConfig) else ""
            raise ValueError(f"{prefix}{name} must be a positive integer, got {value!r}")


def _positive_float(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"lora.{name} must be a positive number, got {value!r}")
