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
    work = out.parent / "work"
    rc = cli.main(["compress", "--model", "demo", "-o", str(out), "--seed", "3", "--report", str(report_file),
                   "--work-dir", str(work), *QUICK])
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
    out, report = compressed
    assert cli.main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts_kept"] == sum(len(v["kept"]) for v in report["layers"].values())
    # The default is a table: one row per MoE layer plus a total, a few hundred characters.
    assert cli.main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == len(report["layers"]) and len(table) < 2000
    for row, (layer, entry) in zip(rows, sorted(report["layers"].items(), key=lambda kv: int(kv[0]))):
        assert row[0] == layer and row[1] == f"{len(entry['kept'])}/16"
        ranks = entry["lowrank"]["ranks"]
        assert row[2] == f"{min(ranks)}-{max(ranks)}"
    total = next(line for line in table.splitlines() if line.split()[:1] == ["all"]).split()
    assert int(total[2].replace(",", "")) == report["parameters"]["routed_expert_before"]
    assert int(total[3].replace(",", "")) == report["parameters"]["routed_expert_after"]

    result_file = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(out), "--tasks", "local", "--limit", "10", "--report", str(result_file)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert result["perplexity"]["perplexity"] > 1.0
    assert 0.0 <= result["zero_shot"]["average"] <= 1.0
    # stdout is a compact table; lm-eval's full dictionary (environment dump included) goes to --report only.
    assert "pretty_env_info" in result["zero_shot"]["raw"]
    assert "pretty_env_info" not in printed and "{" not in printed and len(printed.splitlines()) <= 8
    assert "austen_cloze" in printed and f"{result['perplexity']['perplexity']:.3f}" in printed
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


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def never_load(monkeypatch):
    """Fails the test if the model is loaded: these inputs must be refused before."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "_load_model", load)
    monkeypatch.setattr(cli, "_load_tokenizer", load)
    monkeypatch.setattr(cli, "run_compression", load)


@pytest.mark.parametrize("argv, message", [
    (["--avg-rank", "inf"], "avg_rank"),
    (["--eps", "inf"], "eps"),
    (["--seed", str(2**64)], "seed"),
    (["--population", str(2**61)], "population"),
    (["--generations", str(10**9)], "generations"),
    (["--kt-candidates", "100", "--kt-block", "3"], "kt_candidates ** kt_block"),
    (["--dtype", "int8"], "dtype"),
    (["--device", "gpu"], "device"),
    (["--selection", "best"], "selection"),
    (["--lora", "--lora-rank", "0"], "lora.rank"),
    (["--lora-steps", "3"], "--lora"),
    (["--seq-len", "abc"], "--seq-len"),
    (["--whiten", "no"], "no"),
    # does not fit the demo model (hidden 128, expert width 96: full rank 54; 1024 positions)
    (["--avg-rank", "100"], "avg_rank"),
    (["--preset", "paper"], "seq_len"),
    (["--prune-total", "73"], "prune_total"),
    (["--lora", "--lora-seq-len", "4096"], "lora.seq_len"),
])
def test_settings_are_refused_before_the_model_loads(argv, message, tmp_path, capsys, never_load):
    out = tmp_path / "out"
    assert cli.main(["compress", "-o", str(out), *argv]) == 2
    one_line_error(capsys, "moei2 compress: error: ", message)
    assert not out.exists()


def parsed(argv):
    return cli.build_parser().parse_args(["compress", "-o", "x", *argv])


def test_every_config_field_is_an_option_with_its_default(capsys):
    import dataclasses

    from moei2.config import CompressionConfig, LoRAConfig

    assert cli.main(["compress", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls, prefix in ((CompressionConfig, "--"), (LoRAConfig, "--lora-")):
        for field in dataclasses.fields(cls):
            if field.name != "lora":
                assert prefix + field.name.replace("_", "-") in text, field.name
    for shown in ("(default: 128)", "(default: 2048)", "(default: 0.666667)", "(default: inverse)",
                  "(default: 0.15)", "(default: q_proj,k_proj,v_proj,o_proj)"):
        assert shown in text
    # every field reaches the config, LoRA included
    config = cli.build_config(parsed(["--alpha", "0.3", "--no-whiten", "--selection", "greedy", "--prune-total", "7",
                                      "--no-importance-on-pruned", "--dtype", "float64", "--lora", "--lora-rank", "4",
                                      "--lora-target-modules", "q_proj,v_proj", "--no-lora-train-factors"]))
    assert (config.alpha, config.whiten, config.selection, config.prune_total) == (0.3, False, "greedy", 7)
    assert (config.importance_on_pruned, config.dtype) == (False, "float64")
    assert config.lora == LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"), train_factors=False)


def test_settings_layer_preset_then_file_then_options(tmp_path):
    from moei2.config import CompressionConfig

    # no preset on a model directory: exactly CompressionConfig's defaults
    args = parsed(["--model", "somewhere"])
    assert cli.build_config(args) == CompressionConfig()
    # the demo model gets the quick preset
    assert (cli.build_config(parsed([])).num_sequences, cli.build_config(parsed([])).seq_len) == (64, 256)
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"seq_len": 128, "avg_rank": 20, "population": 30, "lora": {"steps": 7}}))
    config = cli.build_config(parsed(["--config", str(file), "--population", "40", "--lora-rank", "2"]))
    assert (config.num_sequences, config.seq_len, config.population) == (64, 128, 40)
    assert (config.avg_rank, config.rank_keep_ratio) == (20, None)  # the file's avg_rank replaces the ratio
    assert (config.lora.steps, config.lora.rank) == (7, 2)
    config = cli.build_config(parsed(["--config", str(file), "--rank-keep-ratio", "0.5", "--no-lora"]))
    assert (config.avg_rank, config.rank_keep_ratio, config.lora) == (None, 0.5, None)
    assert cli.build_config(parsed(["--no-decompose"])).decomposes is False
    yaml = pytest.importorskip("yaml")
    yfile = tmp_path / "settings.yaml"
    yfile.write_text(yaml.safe_dump({"prune_ratio": 0.5, "whiten": False}))
    config = cli.build_config(parsed(["--config", str(yfile)]))
    assert (config.prune_ratio, config.whiten) == (0.5, False)


@pytest.mark.parametrize("content, message", [
    ('{"bogus": 1}', "bogus"),
    ('{"whiten": "no"}', "whiten"),
    ('{"seq_len": ', "not valid JSON"),
    ('[1, 2]', "mapping"),
])
def test_bad_config_file(content, message, tmp_path, capsys, never_load):
    file = tmp_path / "settings.json"
    file.write_text(content)
    assert cli.main(["compress", "-o", str(tmp_path / "out"), "--config", str(file)]) == 2
    one_line_error(capsys, "--config" if message != "whiten" else "whiten", message)


def test_output_naming_a_file(tmp_path, capsys, never_load):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert cli.main(["compress", "-o", str(target)]) == 2
    one_line_error(capsys, "--output", "is a file")
    assert cli.main(["compress", "-o", str(target / "sub")]) == 2
    one_line_error(capsys, "--output", "is a file")
    assert target.read_text() == "mine"


def test_work_dir_naming_a_file(tmp_path, capsys, never_load):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert cli.main(["compress", "-o", str(tmp_path / "out"), "--work-dir", str(target)]) == 2
    one_line_error(capsys, "--work-dir", "is a file")


def test_unwritable_output_parent(tmp_path, capsys, never_load):
    # /proc refuses new files even to root, where permission bits would not
    assert cli.main(["compress", "-o", "/proc/moei2-out"]) == 2
    one_line_error(capsys, "--output", "cannot write")


def test_full_disk_is_found_before_the_work(tmp_path, capsys, monkeypatch, never_load):
    import errno
    import os

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    assert cli.main(["compress", "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "--output", "disk is full")
    assert not [p for p in tmp_path.iterdir()]  # the probe file is gone


def test_full_disk_at_save_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import moei2.io

    monkeypatch.setattr(cli, "run_compression", lambda model, tokenizer, texts, config, **kw: (model, {}))

    def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(moei2.io, "save", save)
    assert cli.main(["compress", "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "disk is full")


@pytest.mark.parametrize("files, message", [
    ({}, "not a model directory"),
    ({"config.json": '{"model_type": "qwen2_moe", '}, "not valid JSON"),
    ({"config.json": '{"model_type": "llama", "hidden_size": 8}'}, "not a supported MoE"),
    ({"config.json": b"\xff\xfe{}"}, "not valid JSON"),
])
def test_directory_that_is_not_a_model(files, message, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    for name, content in files.items():
        (model / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli.main(["compress", "--model", str(model), "-o", str(tmp_path / "out")]) == 2
    line = one_line_error(capsys, "--model", message)
    assert "tokenizer" not in line


def test_compressing_a_checkpoint_again_is_refused(compressed, tmp_path, capsys, never_load):
    out, _ = compressed
    assert cli.main(["compress", "--model", str(out), "-o", str(tmp_path / "again")]) == 2
    one_line_error(capsys, "already a moei2 checkpoint")


def test_truncated_file_in_work_dir(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "moei2_state.json").write_text('{"fingerprint": "ab')
    assert cli.main(["compress", "-o", str(tmp_path / "out"), "--work-dir", str(work), *QUICK]) == 2
    one_line_error(capsys, "moei2_state.json")
    assert not (tmp_path / "out").exists()


def test_truncated_factors_in_work_dir(compressed, tmp_path, capsys):
    import shutil

    from moei2 import load as moei2_load

    out, _ = compressed
    work = tmp_path / "work"
    shutil.copytree(out.parent / "work", work)
    side_files = sorted(work.glob("*.npz"))
    assert side_files
    data = side_files[0].read_bytes()
    side_files[0].write_bytes(data[: len(data) // 2])
    # The damaged file is not used: its checksum differs from the recorded one, so it is recomputed.
    with pytest.warns(UserWarning, match=f"{side_files[0].name} is not used .its checksum differs"):
        assert cli.main(["compress", "-o", str(tmp_path / "out"), "--seed", "3", "--work-dir", str(work),
                         *QUICK]) == 0
    assert len(side_files[0].read_bytes()) == len(data)
    assert moei2_load(tmp_path / "out").config.moei2 == moei2_load(out).config.moei2


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["evaluate", "demo", "--text", str(tmp_path / "missing.txt")]) == 2
    one_line_error(capsys, "moei2 evaluate: error: ", "missing.txt")
    empty = tmp_path / "model"
    empty.mkdir()
    assert cli.main(["evaluate", str(empty)]) == 2
    one_line_error(capsys, "not a model directory")
    assert cli.main(["inspect", str(empty)]) == 2
    one_line_error(capsys, "moei2 inspect: error: ")


def test_evaluate_perplexity_of_a_text_file(tmp_path, capsys):
    import moei2
    from moei2 import evaluate as ev

    chapters = moei2.demo_texts("heldout")[:1]
    paragraphs = [p.strip() for p in chapters[0].split("\n") if p.strip()][:30]
    file = tmp_path / "wiki.txt"
    file.write_text(" = Heading = \n \n" + "\n\n \n".join(paragraphs) + "\n\n")
    assert ev.read_documents(file) == ["= Heading =", *paragraphs]
    report = tmp_path / "r.json"
    assert cli.main(["evaluate", "demo", "--tasks", "", "--text", str(file), "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    model, tokenizer = moei2.demo_model()
    expected = ev.perplexity(model, tokenizer, ["= Heading =", *paragraphs])
    assert result["perplexity"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    out = capsys.readouterr().out
    assert out.startswith("perplexity") and len(out.splitlines()) == 1


def test_lora_trains_the_factors_on_alpaca_data_and_round_trips(compressed, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    import moei2
    from moei2.config import LoRAConfig
    from moei2.lora import instruction_examples, lora_finetune, lowrank_factor_parameters

    out, _ = compressed
    model = moei2.load(out)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(out)
    records = [{"instruction": "Name the heroine of the novel.", "input": "Pride and Prejudice",
                "output": "Elizabeth Bennet."},
               {"instruction": "Say who Mr. Darcy loves.", "input": "", "output": "He loves Elizabeth."}]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    examples = instruction_examples(tokenizer, records, 256)
    for (ids, labels), record in zip(examples, records):
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert [l for l in labels if l != -100] == response and ids[-len(response):] == response
    before = [p.detach().clone() for p in lowrank_factor_parameters(model)]
    attention = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = lora_finetune(model, tokenizer, None, LoRAConfig(steps=3, batch_size=2, seq_len=128, data=str(data),
                                                              learning_rate=1e-3), seed=0)
    assert result["data"] == "alpaca" and result["examples"] == 2 and result["factors_trained"] == len(before) > 0
    after = lowrank_factor_parameters(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the experts themselves were trained
    assert not torch.equal(attention, model.model.layers[0].self_attn.q_proj.weight)  # LoRA merged
    ids = torch.tensor([tokenizer("It is a truth universally acknowledged")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    moei2.save(model, tmp_path / "recovered", tokenizer=tokenizer)
    with torch.no_grad():
        reloaded = moei2.load(tmp_path / "recovered")(input_ids=ids).logits
    assert torch.equal(logits, reloaded)


@pytest.mark.parametrize("content, suffix, message", [
    ('[{"instruction": "x"}]', ".json", "output"),
    ('{"instruction": "x", "output": "y"}\n{oops', ".jsonl", "line 2"),
    ('[]', ".json", "non-empty"),
])
def test_bad_alpaca_files_are_refused_before_the_model_loads(content, suffix, message, tmp_path, capsys, never_load):
    data = tmp_path / f"data{suffix}"
    data.write_text(content)
    assert cli.main(["compress", "-o", str(tmp_path / "out"), "--lora", "--lora-data", str(data)]) == 2
    one_line_error(capsys, "--lora-data", message)


def test_existing_output_is_left_alone(tmp_path, capsys, never_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["compress", "-o", str(out), *QUICK]) == 2
    assert "exists" in capsys.readouterr().err
    # --overwrite replaces a checkpoint, never other files, and says so before the work
    assert cli.main(["compress", "-o", str(out), "--overwrite", *QUICK]) == 2
    one_line_error(capsys, "--output", "not a moei2 checkpoint")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "1"], "--seq-len"),
    (["--tasks", "3"], "unknown task"),
])
def test_evaluate_options_checked(argv, message, capsys, monkeypatch):
    if message != "unknown task":
        monkeypatch.setattr(cli, "_load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["evaluate", "demo", "--no-perplexity", *argv]) == 2
    one_line_error(capsys, "moei2 evaluate: error: ", message)


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
