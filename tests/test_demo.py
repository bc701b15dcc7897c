"""The bundled demo model, its text and tasks load from the installed package and are what they claim."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2 import demo  # noqa: E402


def _load_tool(name: str):
    """A module of the source tree's tools/ (the demo builder is not part of the installed package)."""
    import importlib

    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))  # as running a script from tools/ does
    return importlib.import_module(name)


demo_corpus = _load_tool("demo_corpus")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return moei2.demo_model()


def test_import_moei2_does_not_import_torch(run_python):
    code = "import sys, moei2; moei2.demo_texts; assert 'torch' not in sys.modules, 'torch imported'"
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr


def test_demo_files_are_package_data():
    path = moei2.demo_model_path()
    package_dir = Path(moei2.__file__).resolve().parent
    assert path.resolve().is_relative_to(package_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_report.json"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size <= 25 * 10**6


def test_demo_model_architecture(model_and_tokenizer):
    from transformers import Qwen2MoeForCausalLM

    model, tokenizer = model_and_tokenizer
    cfg = model.config
    assert isinstance(model, Qwen2MoeForCausalLM)
    assert cfg.num_hidden_layers >= 4
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2
    assert cfg.shared_expert_intermediate_size > 0
    block = model.model.layers[0].mlp
    assert block.shared_expert_gate.weight.shape == (1, cfg.hidden_size)
    assert model.dtype == torch.float32 and not model.training
    assert len(tokenizer) == cfg.vocab_size and tokenizer.eos_token is not None


def test_demo_model_dtype(model_and_tokenizer):
    model, _ = moei2.demo_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        moei2.demo_model(dtype="float32")


def test_demo_model_predicts_austen(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    def top(prompt, k):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        return [tokenizer.decode(int(i)) for i in logits.topk(k).indices]

    assert top("I am very much obliged to", 1) == [" you"]
    assert " fortune" in top("It is a truth universally acknowledged, that a single man in possession of a good", 5)


def test_training_report_beats_unigram():
    report = demo.demo_training_report()
    held = report["heldout"]
    # Measured: perplexity about a tenth of the unigram baseline; assert a wide margin.
    assert held["perplexity"] < 0.3 * held["unigram_perplexity"]
    assert held["tokens"] > 50_000
    arch = report["architecture"]
    assert arch["num_experts"] >= 16 and arch["num_experts_per_tok"] >= 2
    util = report["expert_utilisation"]
    assert len(util["layers"]) == arch["num_hidden_layers"]
    for layer in util["layers"]:
        share = np.array(layer["share"])
        assert share.shape == (arch["num_experts"],)
        assert abs(share.sum() - 1) < 1e-3
        assert share.min() > 0  # every expert is used: pruning has real choices to make
    assert report["training"]["seconds"] <= 30 * 60


def test_demo_texts_splits_are_disjoint():
    splits = {s: moei2.demo_texts(s) for s in ("train", "calibration", "heldout")}
    for name, texts in splits.items():
        assert texts and all(isinstance(t, str) and len(t) > 100 for t in texts), name
    assert not set(splits["heldout"]) & set(splits["train"])
    assert not set(splits["calibration"]) & set(splits["train"])
    assert not set(splits["calibration"]) & set(splits["heldout"])
    assert sum(map(len, splits["train"])) > 3_000_000
    with pytest.raises(ValueError, match="split"):
        moei2.demo_texts("test")


def test_local_task_files():
    from moei2.evaluate import TASKS_DIR, local_tasks

    assert local_tasks() == ["austen_cloze", "austen_continuation"]
    heldout = "\n".join(moei2.demo_texts("heldout"))
    for name in local_tasks():
        rows = [json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 400
        labels = [r["label"] for r in rows]
        assert set(labels) == {0, 1, 2, 3}
        for r in rows[:50]:
            assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
            assert r["context"].split()[-1] in heldout  # built from held-out text


def test_sentence_split_keeps_titles():
    text = 'It suited Mr. Woodhouse. "It is not," he said. Mrs. Elton laughed! Yes.\n\nNew paragraph?'
    assert demo_corpus.sentences_of(text) == [
        "It suited Mr. Woodhouse.", '"It is not," he said.', "Mrs. Elton laughed!", "Yes.", "New paragraph?"]


def test_chapter_split_is_seeded_and_disjoint():
    chapters = [{"book": "B", "chapter": i, "text": str(i)} for i in range(100)]
    a = demo_corpus.split_chapters(chapters, 7, 0.1, 0.05)
    b = demo_corpus.split_chapters(chapters, 7, 0.1, 0.05)
    assert a == b
    ids = [c["chapter"] for part in a.values() for c in part]
    assert sorted(ids) == list(range(100))
    assert len(a["heldout"]) == 10 and len(a["calibration"]) == 5


def test_r_unserializer_reads_named_list():
    """A named list (data.frame-like) as R's serialize(xdr=TRUE, version=2) writes it."""
    import struct

    def i(*v):
        return struct.pack(f">{len(v)}i", *v)

    def charsxp(s):
        b = s.encode()
        return i(0x00040009, len(b)) + b

    strsxp = i(16, 2) + charsxp("a") + charsxp("b")
    realsxp = i(14, 1) + struct.pack(">d", 2.5)
    names = i(16, 2) + charsxp("x") + charsxp("y")
    attr = i(0x402) + i(1) + charsxp("names") + names + i(254)  # pairlist, tag = symbol "names"
    vecsxp = i(0x213, 2) + strsxp + realsxp + attr
    data = b"X\n" + i(2, 0x30000, 0x20300) + vecsxp
    assert demo_corpus._RUnserializer(data).read() == {"x": ["a", "b"], "y": [2.5]}


@pytest.mark.parametrize("name, builder_model", [("default", "demo"), ("fine", "fine")])
def test_builder_defaults_are_the_shipped_runs(name, builder_model):
    """docs/api.md's rebuild command (the defaults, --steps N --time-budget 0) repeats the shipped run."""
    train_demo = _load_tool("train_demo")
    recorded = demo.demo_training_report(name)["training"]
    settings = train_demo.settings_of(builder_model)
    for key in ("steps", "time_budget"):  # the command line fixes these two
        settings.pop(key)
        recorded["hyperparameters"].pop(key)
    assert recorded["hyperparameters"] == settings
    assert train_demo.MODELS[builder_model].directory == demo.DEMO_MODELS[name]
