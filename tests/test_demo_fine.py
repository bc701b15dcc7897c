"""The bundled fine-grained demo model (a miniature DeepSeek-V2-Lite) loads, has the structure it
claims, is the model its training report measured, and runs through the command line."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2 import cli, demo  # noqa: E402

# Pruning only, on a tiny calibration: the whole command in seconds on 64-expert layers.
QUICK = ["--num-sequences", "2", "--seq-len", "32", "--batch-size", "2", "--population", "4",
         "--generations", "1", "--kt-candidates", "1", "--kt-block", "1", "--no-decompose", "--quiet"]


@pytest.fixture(scope="module")
def fine():
    return moei2.demo_model(name="fine")


@pytest.fixture(scope="module")
def report():
    return demo.demo_training_report("fine")


def test_fine_model_is_deepseek_v2_lite_in_miniature(fine):
    from transformers import DeepseekV2ForCausalLM
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP, DeepseekV2Moe

    model, tokenizer = fine
    cfg = model.config
    assert isinstance(model, DeepseekV2ForCausalLM)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (64, 6, 2)
    assert cfg.first_k_dense_replace == 1 and cfg.topk_method == "greedy"
    layers = model.model.layers
    assert type(layers[0].mlp) is DeepseekV2MLP
    assert all(type(layer.mlp) is DeepseekV2Moe for layer in layers[1:])
    assert layers[1].mlp.shared_experts.gate_proj.out_features == 2 * cfg.moe_intermediate_size
    assert model.dtype == torch.float32 and not model.training
    assert len(tokenizer) == cfg.vocab_size
    views = moei2.get_adapter(model).moe_layers()
    assert [v.layer_index for v in views] == list(range(1, cfg.num_hidden_layers))
    assert {v.num_experts for v in views} == {64}


def test_fine_model_shares_the_default_models_tokenizer(fine):
    _, default_tokenizer = moei2.demo_model()
    _, tokenizer = fine
    assert tokenizer.get_vocab() == default_tokenizer.get_vocab()


def test_fine_model_is_the_model_its_report_measured(fine, report):
    from moei2.evaluate import perplexity

    model, tokenizer = fine
    held = report["heldout"]
    measured = perplexity(model, tokenizer, moei2.demo_texts("heldout"), seq_len=held["seq_len"],
                          max_tokens=held["slice_max_tokens"])
    # Only the thread count (reduction order) differs from the report's run.
    assert measured["perplexity"] == pytest.approx(held["slice_perplexity"], rel=1e-4)


def test_fine_model_training_report_meets_its_goals(report):
    held = report["heldout"]
    assert held["perplexity"] <= 0.5 * held["unigram_perplexity"]
    arch = report["architecture"]
    assert (arch["num_experts"], arch["num_experts_per_tok"], arch["n_shared_experts"]) == (64, 6, 2)
    util = report["expert_utilisation"]
    assert [layer["layer"] for layer in util["layers"]] == list(range(1, arch["num_hidden_layers"]))
    for layer in util["layers"]:
        share = np.array(layer["share"])
        assert share.shape == (64,) and abs(share.sum() - 1) < 1e-3
        assert share.min() >= 0.003, f"layer {layer['layer']}: an expert gets under 0.3 % of the routing"
    assert report["training"]["seconds"] <= 40 * 60
    assert set(report["zero_shot"]["tasks"]) == {"austen_cloze", "austen_continuation"}
    assert report["zero_shot"]["average"] > report["zero_shot"]["chance"]


def test_both_bundled_models_fit_the_package_budget():
    total = sum(f.stat().st_size for f in demo.DATA_DIR.rglob("*") if f.is_file())
    assert total <= 60 * 2**20


def test_demo_model_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"name: expected one of \['default', 'fine'\], got 'coarse'"):
        moei2.demo_model(name="coarse")
    with pytest.raises(ValueError, match="name"):
        moei2.demo_model_path("demo-fine")


def test_cli_compresses_and_evaluates_demo_fine(tmp_path):
    out, report_file = tmp_path / "fine-compressed", tmp_path / "report.json"
    assert cli.main(["compress", "--model", "demo-fine", "-o", str(out), "--prune-ratio", "0.25",
                     "--report", str(report_file), *QUICK]) == 0
    report = json.loads(report_file.read_text())
    assert sorted(report["layers"], key=int) == ["1", "2", "3", "4", "5"]
    assert sum(len(info["kept"]) for info in report["layers"].values()) == 5 * 64 - round(0.25 * 5 * 64)
    model = moei2.load(out)
    assert [v.num_experts for v in moei2.get_adapter(model).moe_layers()] == \
        [len(report["layers"][str(layer)]["kept"]) for layer in range(1, 6)]

    result = tmp_path / "eval.json"
    assert cli.main(["evaluate", "demo-fine", "--tasks", "", "--max-tokens", "512", "--report", str(result)]) == 0
    assert json.loads(result.read_text())["perplexity"]["tokens"] > 400


def test_cli_names_the_bundled_models_on_a_bad_model(capsys):
    assert cli.main(["evaluate", "demo-coarse", "--tasks", ""]) == 2
    err = capsys.readouterr().err
    assert "'demo'" in err and "'demo-fine'" in err
