import itertools

import numpy as np
import pytest

from moei2.blockwise import make_blocks, search_block
from moei2.config import CompressionConfig, LoRAConfig


def test_defaults_follow_method():
    c = CompressionConfig()
    assert (c.num_sequences, c.seq_len, c.seed) == (128, 2048, 42)
    assert (c.prune_ratio, c.population, c.generations) == (0.25, 100, 50)
    assert (c.kt_candidates, c.kt_block, c.alpha, c.eps) == (3, 3, 0.15, 1e-8)
    assert c.prunes and c.decomposes


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"prune_ratio": -0.1}, "prune_ratio"),
        ({"population": 0}, "population"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"seed": -1}, "seed"),
        ({"prune_rule": "random"}, "prune_rule"),
        ({"rank_keep_ratio": 0.5, "avg_rank": 8}, "at most one"),
        ({"rank_keep_ratio": 1.5}, "rank_keep_ratio"),
        ({"mutation_rate": 2}, "mutation_rate"),
        ({"dtype": "int8"}, "dtype"),
        ({"lora": {"rank": 0}}, "lora.rank"),
    ],
)
def test_bad_config_names_the_field(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        CompressionConfig(**kwargs)


def test_config_round_trip_and_fingerprint():
    c = CompressionConfig(prune_ratio=0.5, lora=LoRAConfig(rank=4))
    d = c.to_dict()
    c2 = CompressionConfig.from_dict(d)
    assert c2 == c and c2.fingerprint() == c.fingerprint()
    assert CompressionConfig(seed=1).fingerprint() != CompressionConfig(seed=2).fingerprint()
    with pytest.raises(ValueError, match="unknown"):
        CompressionConfig.from_dict({"bogus": 1})


def test_make_blocks():
    assert make_blocks([1, 2, 3, 4, 5, 6, 7], 3) == [[1, 2, 3], [4, 5, 6], [7]]
    with pytest.raises(ValueError):
        make_blocks([1], 0)


def test_search_block_matches_brute_force_and_shares_prefixes():
    rng = np.random.default_rng(0)
    K, T, d = [3, 2, 3], 3, 5
    mats = {(p, c): rng.normal(size=(d, d)) / 2 for p in range(T) for c in range(K[p])}
    calls = []

    def forward(p, c, h):
        calls.append((p, c))
        return np.tanh(h @ mats[(p, c)])

    batches = [(rng.normal(size=(4, d)), rng.normal(size=(4, d))) for _ in range(3)]
    dist = lambda a, b: float(np.linalg.norm(a - b))
    combos, losses = search_block(K, forward, batches, dist)
    assert combos.shape == (18, 3)
    for combo, loss in zip(combos, losses):
        expected = 0.0
        for h, target in batches:
            for p, c in enumerate(combo):
                h = np.tanh(h @ mats[(p, c)])
            expected += np.linalg.norm(h - target)
        assert loss == pytest.approx(expected, rel=1e-12)
    # prefix sharing: K0 + K0*K1 + K0*K1*K2 layer passes per batch
    assert len(calls) == 3 * (3 + 6 + 18)
    assert sorted(map(tuple, combos.tolist())) == sorted(itertools.product(range(3), range(2), range(3)))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"avg_rank": float("inf"), "rank_keep_ratio": None}, "avg_rank"),
        ({"avg_rank": float("nan"), "rank_keep_ratio": None}, "avg_rank"),
        ({"eps": float("inf")}, "eps"),
        ({"whiten": "no"}, "whiten"),
        ({"importance_on_pruned": 1}, "importance_on_pruned"),
        ({"lora": {"merge": "yes"}}, "lora.merge"),
        ({"lora": {"train_factors": 0}}, "lora.train_factors"),
        ({"lora": {"target_modules": [1]}}, "lora.target_modules"),
        ({"lora": {"bogus": 1}}, "lora.bogus"),
        ({"seed": 2**64}, "seed"),
        ({"seed": True}, "seed"),
        ({"population": 2**61}, "population"),
        ({"generations": 10**9}, "generations"),
        ({"kt_candidates": 100, "kt_block": 3}, "kt_candidates"),
        ({"kt_candidates": 2, "kt_block": 10**9}, "kt_block"),
        ({"elite_fraction": "a"}, "elite_fraction"),
        ({"prune_ratio": True}, "prune_ratio"),
        ({"alpha": float("inf")}, "alpha"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        CompressionConfig(**kwargs)


def test_largest_accepted_values():
    c = CompressionConfig(seed=2**64 - 1, population=100_000, kt_candidates=100, kt_block=2)
    assert c.seed == 2**64 - 1
    assert CompressionConfig(kt_candidates=1, kt_block=10**6).kt_block == 10**6  # 1 combination


def test_every_field_has_help():
    import dataclasses

    for cls in (CompressionConfig, LoRAConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_paper_preset_matches_the_reported_expert_reduction():
    from moei2.config import paper_avg_rank, preset

    # Mixtral-8x7B (hidden 4096, width 14336): about 50 % of expert parameters removed;
    # DeepSeek-V2-Lite (2048, 1408): 53.98 %; both with 25 % of the experts pruned.
    for family, h, w, reduction, rank in [("mixtral", 4096, 14336, 0.50, 2124), ("deepseek_v2", 2048, 1408, 0.5398, 512)]:
        assert paper_avg_rank(family, h, w) == rank
        assert 1 - 0.75 * rank * (h + w) / (h * w) == pytest.approx(reduction, abs=5e-4)
    settings = preset("paper", family="deepseek_v2", hidden_size=2048, expert_width=1408)
    c = CompressionConfig.from_dict(settings)
    assert (c.num_sequences, c.seq_len, c.avg_rank, c.rank_keep_ratio) == (128, 2048, 512, None)
    assert c.lora == LoRAConfig()
    assert preset("quick") == {"num_sequences": 64, "seq_len": 256}
    with pytest.raises(ValueError, match="preset"):
        preset("fast")
