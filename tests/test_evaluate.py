"""Evaluation API: perplexity against a direct computation, lm-eval zero-shot on the bundled tasks,
the registered lm-eval model type, and input validation."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402
from moei2 import evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    return moei2.demo_model()


@pytest.fixture(scope="module")
def heldout():
    return moei2.demo_texts("heldout")[:2]


def direct_nll(model, tokenizer, texts, seq_len, max_tokens):
    """Reference: one window at a time, cross-entropy in float64."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = torch.tensor(ids[start:start + seq_len])
            if len(window) < 2:
                continue
            logits = model(input_ids=window[None]).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += len(window) - 1
    return total, count


@pytest.mark.parametrize("seq_len,batch_size,max_tokens", [(64, 8, 1000), (100, 3, 777), (256, 1, 600)])
def test_perplexity_matches_direct_computation(demo, heldout, seq_len, batch_size, max_tokens):
    model, tokenizer = demo
    result = ev.perplexity(model, tokenizer, heldout, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    nll, count = direct_nll(model, tokenizer, heldout, seq_len, max_tokens)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_per_window_and_standard_error(demo, heldout):
    model, tokenizer = demo
    result = ev.perplexity(model, tokenizer, heldout, seq_len=64, batch_size=4, max_tokens=1000, per_window=True)
    ids = tokenizer("\n\n".join(heldout), add_special_tokens=False)["input_ids"][:1000]
    expected = []
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            window = torch.tensor(ids[start:start + 64])
            logits = model(input_ids=window[None]).logits[0].double()
            expected.append(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item())
    assert result["window_tokens"] == [min(64, len(ids) - s) - 1 for s in range(0, len(ids), 64)]
    assert result["window_nll"] == pytest.approx(expected, rel=1e-5)
    # The ratio estimator's standard error, written out directly.
    nll, tokens = np.array(expected), np.array(result["window_tokens"], dtype=float)
    n, mean = len(nll), nll.sum() / tokens.sum()
    var = n / (n - 1) * np.sum((nll - mean * tokens) ** 2) / tokens.sum() ** 2
    assert result["perplexity_stderr"] == pytest.approx(np.exp(mean) * np.sqrt(var), rel=1e-6)
    assert 0 < result["perplexity_stderr"] < 0.2 * result["perplexity"]
    assert "window_nll" not in ev.perplexity(model, tokenizer, heldout, max_tokens=1000)


def test_perplexity_of_demo_model_is_low(demo, heldout):
    model, tokenizer = demo
    ppl = ev.perplexity(model, tokenizer, heldout, max_tokens=4000)["perplexity"]
    # The vocabulary has 4096 tokens; a trained model is far below uniform and unigram.
    assert ppl < 0.3 * moei2.demo.demo_training_report()["heldout"]["unigram_perplexity"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(texts=[]), ValueError, "texts"),
    (dict(texts=["", "  "]), ValueError, "texts"),
    (dict(texts="a plain string"), TypeError, "texts"),
    (dict(texts=["a"], seq_len=1), ValueError, "seq_len"),
    (dict(texts=["a"], seq_len=0), ValueError, "seq_len"),
    (dict(texts=["a"], seq_len=100_000), ValueError, "seq_len"),
    (dict(texts=["a"], seq_len=2.5), TypeError, "seq_len"),
    (dict(texts=["a b c"], batch_size=0), ValueError, "batch_size"),
    (dict(texts=["a b c"], max_tokens=1), ValueError, "max_tokens"),
])
def test_perplexity_rejects_bad_input(demo, kwargs, error, match):
    model, tokenizer = demo
    texts = kwargs.pop("texts")
    with pytest.raises(error, match=match):
        ev.perplexity(model, tokenizer, texts, **kwargs)


def test_throughput_generates_requested_tokens(demo):
    model, tokenizer = demo
    result = ev.throughput(model, tokenizer, prompt_len=8, new_tokens=6, batch_size=2, repeats=2)
    assert result["new_tokens"] == 12 and result["prefill_tokens"] == 16
    assert len(result["seconds"]) == 2 and result["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="new_tokens"):
        ev.throughput(model, tokenizer, new_tokens=0)


def test_zero_shot_local_tasks(demo):
    model, tokenizer = demo
    result = ev.zero_shot(model, tokenizer, "local", limit=60, batch_size=16)
    assert set(result["tasks"]) == {"austen_cloze", "austen_continuation"}
    for name, r in result["tasks"].items():
        assert 0.0 <= r["acc"] <= 1.0 and r["samples"] == 60, name
        assert r["acc_stderr"] is not None and 0 < r["acc_stderr"] < 0.1
    assert result["average"] == pytest.approx(sum(r["acc"] for r in result["tasks"].values()) / 2)
    # Chance is 0.25 on both tasks (four choices). Measured on these 60 items: cloze 0.85,
    # continuation 0.58, average 0.72.
    assert result["average"] > 0.5
    assert result["raw"]["results"]["austen_cloze"]["acc,none"] == result["tasks"]["austen_cloze"]["acc"]
    assert not model.training


def test_zero_shot_bad_tasks(demo):
    model, tokenizer = demo
    with pytest.raises(ValueError, match="unknown task"):
        ev.zero_shot(model, tokenizer, "no_such_task", limit=2)
    with pytest.raises(ValueError, match="not available offline"):
        ev.zero_shot(model, tokenizer, "arc_easy", limit=2)
    with pytest.raises(TypeError, match="tasks"):
        ev.zero_shot(model, tokenizer, 3)
    with pytest.raises(ValueError, match="limit"):
        ev.zero_shot(model, tokenizer, "local", limit=0)


def test_lm_eval_model_type_resolves_and_runs():
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    cls = get_model("moei2")
    assert cls is ev.MoEI2LM and issubclass(cls, HFLM)
    # What `moei2-lm-eval --model moei2 --model_args pretrained=DIR` does, on a plain HF directory.
    out = lm_eval.simple_evaluate(model="moei2", model_args=f"pretrained={moei2.demo_model_path()},batch_size=4",
                                  tasks=["austen_cloze"], limit=8,
                                  task_manager=TaskManager(include_path=str(ev.TASKS_DIR), include_defaults=False))
    assert 0.0 <= out["results"]["austen_cloze"]["acc,none"] <= 1.0
    with pytest.raises(ValueError, match="pretrained"):
        cls(pretrained="/no/such/dir")


def test_lm_eval_console_script_lists_bundled_tasks(capsys):
    pytest.importorskip("lm_eval")
    ev.lm_eval_main(["validate", "--tasks", "austen_cloze,austen_continuation"])
    out = capsys.readouterr()
    assert "austen_cloze" in out.out + out.err


def test_paper_tasks_are_the_seven_of_the_paper():
    paper = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "rte", "winogrande"]
    assert list(ev.PAPER_TASKS) == paper
    assert ev._task_names("paper") == paper
    assert ev._task_names("paper,piqa") == [*paper, "piqa"]  # piqa stays available by name
    assert ev._task_names(["local", "paper"]) == [*ev.local_tasks(), *paper]


def test_read_documents(tmp_path):
    file = tmp_path / "ptb.txt"
    file.write_text("a b c\nd e f\n\n\n  \ng h\r\n\r\ni\n")
    assert ev.read_documents(file) == ["a b c\nd e f", "g h", "i"]
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="no text"):
        ev.read_documents(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        ev.read_documents(tmp_path / "bin.txt")
    with pytest.raises(ValueError, match="not a file"):
        ev.read_documents(tmp_path / "missing.txt")


def test_format_result_is_a_compact_table():
    result = {"zero_shot": {"tasks": {"arc_easy": {"acc": 0.5, "acc_stderr": 0.01, "samples": 100},
                                      "boolq": {"acc": 0.75, "acc_stderr": None, "samples": 40}},
                            "average": 0.625, "raw": {"config": {"pretty_env_info": "x" * 10_000}}},
              "perplexity": {"perplexity": 12.3456, "tokens": 5000, "nll": 1.0},
              "throughput": {"tokens_per_s": 99.94, "batch_size": 1, "threads": 2, "seconds": [1.0]}}
    text = ev.format_result(result)
    assert len(text.splitlines()) == 7 and "pretty_env_info" not in text
    assert "0.5000" in text and "0.0100" in text and "   100" in text and "0.6250" in text
    assert "12.346 over 5,000 tokens" in text and "99.9 tokens/s" in text
    result["perplexity"]["perplexity_stderr"] = 0.2345
    assert "12.346 ± 0.234 over 5,000 tokens" in ev.format_result(result)
