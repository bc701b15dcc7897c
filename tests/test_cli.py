"""The moei2 command line on the bundled demo model, in process (plus one real subprocess)."""
import json

import pytest

pytest.importorskip("torch")

from moei2 import cli  # noqa: E402

QUICK = ["--num-sequences", "6", "--seq-len", "64", "--batch-size", "3", "--population", "16",
         "--generations", "4", "--kt-candidates", "2", "--kt-block", "2", "--quiet"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo-compressed"
    report_file = out.parent / "report.json"
    rc = cli.main(["compress", "--model", "demo", "-o", str(out), "--seed", "3", "--report", str(report_file), *QUICK])
    assert rc == 0
    return out, json.loads(report_file.read_text())


def test_compress_writes_a_checkpoint_and_report(compressed, capsys):
    import moei2

    out, report = compressed
    assert moei2.is_moei2_checkpoint(out)
    assert report["seed"] == 3
    assert report["checkpoint"]["bytes_after"] < report["checkpoint"]["bytes_before"]
    assert 0.3 < report["parameters"]["routed_expert_reduction"] < 0.8
    info = moei2.inspect_checkpoint(out)
    assert info  # a readable summary
    model = moei2.load(out)
    views = moei2.get_adapter(model).moe_layers()
    assert [v.num_experts for v in views] == [len(report["layers"][str(v.layer_index)]["kept"]) for v in views]


def test_inspect_evaluate_and_report(compressed, capsys, tmp_path):
    out, _ = compressed
    assert cli.main(["inspect", str(out)]) == 0
    json.loads(capsys.readouterr().out)
    result_file = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(out), "--tasks", "local", "--limit", "10", "--report", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    assert result["perplexity"]["perplexity"] > 1.0
    assert 0.0 <= result["zero_shot"]["average"] <= 1.0
    figures = tmp_path / "figures"
    assert cli.main(["report", str(out), "-o", str(figures)]) == 0
    assert {p.name for p in figures.iterdir()} >= {"importance.png", "search_convergence.png", "ranks.png"}


@pytest.mark.parametrize("argv, message", [
    (["compress", "--prune-ratio", "1.5"], "prune_ratio"),
    (["compress", "--model", "/nonexistent/model"], "--model"),
    (["compress", "--calibration", "/nonexistent.txt"], "--calibration"),
    (["compress", "--seq-len", "0"], "seq_len"),
])
def test_bad_input_exits_2_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "moei2 compress: error: " in err and message in err
    assert not out.exists()


def test_existing_output_is_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["compress", "-o", str(out), *QUICK]) == 2
    assert "exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_console_entry_point_runs(run_python):
    done = run_python("-m", "moei2", "--help")
    assert done.returncode == 0, done.stderr
    for command in ("compress", "evaluate", "inspect", "report"):
        assert command in done.stdout


def test_stock_lm_eval_hf_model_loads_the_checkpoint(compressed):
    """lm-eval's own `hf` model type reads a moei2 checkpoint through trust_remote_code."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from moei2.evaluate import TASKS_DIR

    out, _ = compressed
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True",
                                     tasks=["austen_cloze"], task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                     limit=8, device="cpu", batch_size=4)
    from transformers import AutoTokenizer

    import moei2
    from moei2 import evaluate

    ours = evaluate.zero_shot(moei2.load(out), AutoTokenizer.from_pretrained(out), ["austen_cloze"], limit=8,
                              batch_size=4)
    # The same accuracy as moei2's own loader: lm-eval evaluated the compressed model itself.
    assert result["results"]["austen_cloze"]["acc,none"] == ours["tasks"]["austen_cloze"]["acc"]
