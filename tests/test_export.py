"""Export for serving: a uniformly pruned checkpoint as a plain checkpoint of its architecture."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2.cli import main  # noqa: E402
from moei2.models import get_adapter  # noqa: E402

from .tiny_models import (EXPERTS, FAMILIES, LLAMA4, SCORED_FAMILIES, build_model, build_scored_model,  # noqa: E402
                          input_ids)


def tiny_model(family, **overrides):
    if family in SCORED_FAMILIES:
        return build_scored_model(family, **overrides)
    return build_model(family, tie=family == "olmoe", **overrides)


def uniformly_pruned(family, tmp_path, drop=(1, 4, 6)):
    model = tiny_model(family)
    layers = get_adapter(model).moe_layer_indices
    # different experts per layer, the same count
    moei2.prune_experts(model, {i: [(j + n) % EXPERTS for j in drop] for n, i in enumerate(layers)})
    moei2.save(model, tmp_path / "ckpt")
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES + SCORED_FAMILIES + (LLAMA4,))
def test_export_loads_in_stock_transformers(family, tmp_path):
    uniformly_pruned(family, tmp_path)
    info = moei2.export(tmp_path / "ckpt", tmp_path / "plain")
    assert info["num_experts"] == EXPERTS - 3
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "moei2" not in config and "auto_map" not in config
    for key in info["expert_count_keys"]:
        assert config[key] == EXPERTS - 3
    assert not any(p.suffix == ".py" or p.name == "moei2.json" for p in (tmp_path / "plain").iterdir())
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    ids = input_ids(2, 9)
    reference = moei2.load(tmp_path / "ckpt")
    assert type(plain) is type(reference)
    torch.testing.assert_close(logits(plain, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    # An earlier export is replaced only when asked.
    with pytest.raises(FileExistsError, match="already exists"):
        moei2.export(tmp_path / "ckpt", tmp_path / "plain")
    moei2.export(tmp_path / "ckpt", tmp_path / "plain", overwrite=True)


def test_export_refuses_per_layer_counts_and_low_rank(tmp_path, capsys):
    model = build_model("qwen3_moe")
    moei2.prune_experts(model, {0: [1], 1: [2, 3]})
    moei2.save(model, tmp_path / "counts")
    with pytest.raises(ValueError, match=r"different numbers of experts \(layer 0: 7, layer 1: 6, layer 2: 8\).*"
                                         r"--prune-rule uniform"):
        moei2.export(tmp_path / "counts", tmp_path / "out")
    view = get_adapter(model).view(2)
    factors = {j: {name: (w, torch.eye(w.shape[1])) for name, w in zip(("gate", "up", "down"), view.expert(j))}
               for j in range(view.num_experts)}
    moei2.prune_experts(model, {0: [0], 2: [0, 1]})
    moei2.lowrank_experts(model, {2: {j: factors[j + 2] for j in range(6)}})
    moei2.save(model, tmp_path / "lowrank")
    assert main(["export", str(tmp_path / "lowrank"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "low-rank" in err and "--no-decompose" in err
    assert not (tmp_path / "out").exists()


def test_cli_export_and_bad_output(tmp_path, capsys):
    uniformly_pruned("mixtral", tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "taken"), "--overwrite"]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "plain")]) == 0
    assert "5 experts" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["num_local_experts"] == 5
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x")]) == 2


def test_export_of_accepted_group_limited_routing_is_greedy(tmp_path):
    model = build_model("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=2)
    layers = get_adapter(model).moe_layer_indices
    moei2.prune_experts(model, {i: [0, 3, 5] for i in layers})
    moei2.save(model, tmp_path / "ckpt")
    moei2.export(tmp_path / "ckpt", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["topk_method"] == "greedy" and config["n_routed_experts"] == 5
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    ids = input_ids(2, 7)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_export_of_group_limited_routing_keeps_equal_groups(tmp_path):
    """DeepSeek-V3 routing to the best 1 of 2 groups: equal drops from both groups export with the
    groups kept (n_group=2 over 6 experts); a count the groups cannot share equally is refused."""
    from moei2.models.deepseek_v3 import DeepseekV3Adapter

    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    layers = get_adapter(model).moe_layer_indices
    moei2.prune_experts(model, {i: [0, 5] if n % 2 else [2, 7] for n, i in enumerate(layers)})
    moei2.save(model, tmp_path / "ckpt")
    moei2.export(tmp_path / "ckpt", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (6, 2, 1)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    ids = input_ids(2, 7)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="7 experts cannot form the router's 2 equal groups"):
        DeepseekV3Adapter.export_config(model.config, 7)
