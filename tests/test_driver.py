"""The staged driver: model sources, the sink, KT through the routing, the torch candidate path."""
import contextlib
import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moei2  # noqa: E402
from moei2 import search  # noqa: E402
from moei2.models import apply_structure, get_adapter  # noqa: E402
from moei2.pipeline import compress_source  # noqa: E402
from moei2.source import InMemorySource  # noqa: E402

from .test_pipeline import (CharTokenizer, calibration_texts, count_calls, last_hidden_states,  # noqa: E402
                            small_config)
from .tiny_models import EXPERTS, FAMILIES, build_model  # noqa: E402


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class DictSink:
    def __init__(self):
        self.tensors, self.calls = {}, 0

    def add(self, tensors):
        self.calls += 1
        for k, v in tensors.items():
            assert k not in self.tensors, f"{k} written twice"
            self.tensors[k] = v.clone()


class CopyingSource(InMemorySource):
    """Streamed semantics on a model in memory: decoder layers live on the meta device, a fresh
    copy of the stored layer is materialised for each scope and dropped at its end, so anything
    the driver does outside a layer's scope is lost, as with a checkpoint read from disk."""

    streamed = True

    def __init__(self, model):
        super().__init__(model)
        self._stored = [copy.deepcopy(layer) for layer in self.adapter.layers_module]
        self._fingerprint = InMemorySource(model, adapter=self.adapter).fingerprint()
        for i, layer in enumerate(self._stored):
            self.adapter.layers_module[i] = copy.deepcopy(layer).to("meta")
        self.resident = set()
        self.most_resident = 0

    def fingerprint(self):
        return self._fingerprint

    @contextlib.contextmanager
    def layer(self, index):
        skeleton = self.adapter.layers_module[index]
        self.adapter.layers_module[index] = copy.deepcopy(self._stored[index])
        self.resident.add(index)
        self.most_resident = max(self.most_resident, len(self.resident))
        try:
            yield self.adapter.layers_module[index]
        finally:
            self.adapter.layers_module[index] = skeleton
            self.resident.discard(index)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_routing_is_the_pruned_layer(family):
    """A mask applied through the router gives the pruned decoder layer's output, for every family."""
    from moei2.stages import masked_routing

    model = build_model(family, layers=2)
    adapter = get_adapter(model)
    index = adapter.moe_layer_indices[0]
    layer = adapter.layers_module[index]
    x = torch.randn(3, 10, 32)
    rng = np.random.default_rng(0)
    for r in (1, 3, EXPERTS - 2):
        mask = np.zeros(EXPERTS, dtype=bool)
        mask[rng.choice(EXPERTS, size=r, replace=False)] = True
        pruned_model = moei2.prune_experts(copy.deepcopy(model), {index: np.flatnonzero(mask).tolist()})
        pruned = get_adapter(pruned_model).layers_module[index]
        block, pruned_block = adapter.moe_block(layer), adapter.moe_block(pruned)

        def hidden(module):  # gpt-oss's block also returns its router scores
            out = module(x)
            return out[0] if isinstance(out, tuple) else out

        with torch.no_grad():
            with masked_routing(adapter.view(index), mask):
                masked = hidden(block)
            unmasked = hidden(block)
            expected = hidden(pruned_block)
        torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(unmasked, expected)
    # The hook is gone after the scope.
    with torch.no_grad():
        torch.testing.assert_close(hidden(block), unmasked, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kt_losses_are_the_pruned_models_error(family):
    """Every KT combination's loss equals the hidden-state error of the model pruned that way."""
    from moei2.calibration_data import calibration_windows

    model = build_model(family, layers=3)
    original = copy.deepcopy(model)
    config = small_config(kt_block=3, kt_candidates=2, rank_keep_ratio=None)
    _, report = moei2.compress(model, CharTokenizer(), calibration_texts(), config, progress=False)
    block = report["blocks"][0]
    moe_layers = get_adapter(original).moe_layer_indices
    assert block["layers"] == moe_layers and len(block["losses"]) == 2 ** len(moe_layers)
    ids = calibration_windows(CharTokenizer(), calibration_texts(), config.num_sequences, config.seq_len, config.seed)

    def last_hidden(m):
        return last_hidden_states(m, ids, config.calib_batch_size)

    target = last_hidden(original)
    for combo, loss in zip(block["combinations"], block["losses"]):
        candidate = copy.deepcopy(original)
        dropped = {l: np.flatnonzero(report["layers"][str(l)]["search"]["candidates"][c]).tolist()
                   for l, c in zip(block["layers"], combo)}
        moei2.prune_experts(candidate, {l: d for l, d in dropped.items() if d})
        direct = sum(torch.linalg.vector_norm((a - b).double()).item() for a, b in zip(last_hidden(candidate), target))
        assert loss == pytest.approx(direct, rel=1e-4)


def test_kt_step_copies_no_layer(monkeypatch):
    """The KT walk over every combination of a block's candidates runs, and copies no module."""
    calls = {"n": 0}
    real = copy.deepcopy

    def counting(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            calls["n"] += 1
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting)
    _, report = moei2.compress(build_model("qwen2_moe", layers=3), CharTokenizer(), calibration_texts(),
                               small_config(kt_block=3, kt_candidates=3), progress=False)
    assert calls["n"] == 0
    block, = report["blocks"]
    sizes = [len(report["layers"][str(l)]["search"]["candidates"]) for l in block["layers"]]
    assert block["layers"] == [0, 1, 2] and min(sizes) > 1
    assert len(block["combinations"]) == len(block["losses"]) == int(np.prod(sizes))
    assert all(loss is not None and loss > 0 for loss in block["losses"])
    assert block["loss"] == min(block["losses"])


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_candidate_outputs_equal_from_moe(family):
    """The device path's search cache (candidate outputs in torch) equals the C core's from_moe."""
    from moei2.calibrate import iter_layer_stats
    from moei2.stages.common import Context
    from moei2.stages.selection import search_layer

    model = build_model(family, layers=2)
    adapter = get_adapter(model)
    ids = torch.randint(3, 100, (6, 16), generator=torch.Generator().manual_seed(0))
    stats = next(iter(iter_layer_stats(model, ids, batch_size=3, progress=False)))
    view = adapter.view(stats.layer_index)
    ctx = Context(source=InMemorySource(model, adapter=adapter), config=None, runner=None, input_ids=ids,
                  batches=[], batch_sizes=[48, 48], state=None)
    reference = search_layer(ctx, stats, view, 4)
    ctx.torch_kernels = True
    torch_layer = search_layer(ctx, stats, view, 4)
    np.testing.assert_allclose(torch_layer.expert_importance(), reference.expert_importance(), rtol=1e-5)
    masks = np.zeros((20, EXPERTS), dtype=bool)
    rng = np.random.default_rng(2)
    for m in masks:
        m[rng.choice(EXPERTS, size=rng.integers(1, 5), replace=False)] = True
    np.testing.assert_allclose(torch_layer.loss(masks), reference.loss(masks), rtol=1e-5)


def test_torch_candidate_path_makes_the_same_choices():
    config = small_config()
    model_a, model_b = build_model("qwen3_moe", layers=3), build_model("qwen3_moe", layers=3)
    a = compress_source(InMemorySource(model_a), CharTokenizer(), calibration_texts(), config, progress=False)
    b = compress_source(InMemorySource(model_b), CharTokenizer(), calibration_texts(),
                        dataclasses.replace(config, kernels="torch"), progress=False)
    for l, info in a["layers"].items():
        assert b["layers"][l]["dropped"] == info["dropped"]
        assert b["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
        np.testing.assert_allclose(b["layers"][l]["importance"], info["importance"], rtol=1e-5)
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(logits_of(model_b, ids), logits_of(model_a, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_sink_receives_the_compressed_state_dict(family):
    model = build_model(family, layers=4, tie=family == "qwen2_moe")
    sink = DictSink()
    report = compress_source(InMemorySource(model), CharTokenizer(), calibration_texts(), small_config(),
                             sink=sink, progress=False)
    state = model.state_dict()
    assert sink.calls == len(get_adapter(model).layers_module) + 1
    assert sorted(sink.tensors) == sorted(state)
    for k, v in state.items():
        torch.testing.assert_close(sink.tensors[k], v, rtol=0, atol=0)
    assert report["parameters"]["model_after"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_streamed_semantics_give_the_in_memory_result(family):
    """A source whose layer changes are lost outside their scope: the sink still holds the
    compressed model, the moei2 record is complete, and at most one KT block is resident."""
    config = small_config(kt_block=2)
    reference = build_model(family, layers=4)
    ref_report = compress_source(InMemorySource(reference), CharTokenizer(), calibration_texts(), config,
                                 progress=False)
    source = CopyingSource(build_model(family, layers=4))
    sink = DictSink()
    report = compress_source(source, CharTokenizer(), calibration_texts(), config, sink=sink, progress=False)
    for l, info in ref_report["layers"].items():
        assert report["layers"][l]["dropped"] == info["dropped"]
        assert report["layers"][l]["lowrank"]["ranks"] == info["lowrank"]["ranks"]
    assert report["parameters"] == ref_report["parameters"]
    assert source.most_resident <= 2
    record = source.model.config.moei2
    assert record == reference.config.moei2
    rebuilt = build_model(family, layers=4, seed=9)
    apply_structure(rebuilt, record)
    rebuilt.load_state_dict(sink.tensors, strict=True)
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(logits_of(rebuilt, ids), logits_of(reference, ids), rtol=0, atol=0)


def test_half_precision_model_computes_in_float32_and_stays_in_its_dtype():
    model = build_model("olmoe", layers=2, dtype=torch.bfloat16)
    sink = DictSink()
    report = compress_source(InMemorySource(model), CharTokenizer(), calibration_texts(), small_config(), sink=sink,
                             progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {v.dtype for v in sink.tensors.values() if v.is_floating_point()} == {torch.bfloat16}
    assert report["parameters"]["model_bytes_after"] == 2 * sum(p.numel() for p in model.parameters())
    assert torch.isfinite(logits_of(model, torch.randint(3, 100, (1, 8))).float()).all()


def test_refuses_low_rank_experts_before_any_work():
    model = build_model("mixtral", layers=2)
    moei2.compress(model, CharTokenizer(), calibration_texts(), small_config(prune_ratio=0.0), progress=False)
    with pytest.raises(ValueError, match="already low-rank"):
        moei2.compress(model, CharTokenizer(), calibration_texts(), small_config(), progress=False)


def test_resume_keeps_finished_factors(tmp_path, monkeypatch):
    """An interruption during the decomposition: the rerun does not decompose finished layers again."""
    from moei2 import lowrank

    config = small_config()
    reference, ref_report = moei2.compress(build_model("qwen2_moe", layers=4), CharTokenizer(), calibration_texts(),
                                           config, progress=False)
    calls = count_calls(monkeypatch, lowrank, "decompose_many", interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        moei2.compress(build_model("qwen2_moe", layers=4), CharTokenizer(), calibration_texts(), config,
                       work_dir=tmp_path, progress=False)
    calls["n"] = 0
    genetic_calls = count_calls(monkeypatch, search.Layer, "genetic")
    model, report = moei2.compress(build_model("qwen2_moe", layers=4), CharTokenizer(), calibration_texts(), config,
                                   work_dir=tmp_path, progress=False)
    assert calls["n"] == 2  # layers 2 and 3 only
    assert genetic_calls["n"] == 0  # every block had been chosen
    for l, info in ref_report["layers"].items():
        assert report["layers"][l]["dropped"] == info["dropped"]
        assert report["layers"][l]["lowrank"] == info["lowrank"]
    ids = torch.randint(3, 100, (2, 12))
    torch.testing.assert_close(logits_of(model, ids), logits_of(reference, ids), rtol=0, atol=0)


def test_progress_bar_per_pass(capsys):
    moei2.compress(build_model("olmoe", layers=2), CharTokenizer(), calibration_texts(), small_config(),
                   progress=True)
    err = capsys.readouterr().err
    assert "pass 1: importance" in err and "pass 2: search, KT, low-rank" in err and "2/2" in err


def test_driver_bad_arguments_fail_before_any_work():
    model = build_model("mixtral", layers=2)
    source = InMemorySource(model)
    with pytest.raises(TypeError, match="sink"):
        compress_source(source, CharTokenizer(), calibration_texts(), small_config(), sink={}, progress=False)
    with pytest.raises(ValueError, match="search_hidden"):
        small_config(search_hidden="both")
    streamed = CopyingSource(build_model("mixtral", layers=2))
    with pytest.raises(ValueError, match="LoRA"):
        compress_source(streamed, CharTokenizer(), calibration_texts(),
                        small_config(lora=moei2.LoRAConfig(steps=1)), progress=False)
    with pytest.raises(ValueError, match="device"):
        InMemorySource(model, device="nowhere")


def test_waiting_layers_are_parked_in_their_storage_dtype_without_changing_the_result(monkeypatch):
    """A bfloat16 model computes in float32; while a KT block is resident only the computing layer
    is in float32, and parking (exact for stored values) changes no choice and no weight."""
    import moei2.pipeline as pipeline
    from moei2.stages.common import Context

    config = small_config(kt_block=2)
    widest = {"float32 layers": 0}
    real_run = Context.run

    def run(self, index, module, hidden):
        wide = sum(any(p.dtype == torch.float32 for p in layer.parameters()) for layer in self.adapter.layers_module)
        widest["float32 layers"] = max(widest["float32 layers"], wide)
        return real_run(self, index, module, hidden)

    monkeypatch.setattr(Context, "run", run)
    parked_sink, plain_sink = DictSink(), DictSink()
    parked = compress_source(InMemorySource(build_model("qwen2_moe", layers=4, dtype=torch.bfloat16)), CharTokenizer(),
                             calibration_texts(), config, sink=parked_sink, progress=False)
    assert widest["float32 layers"] == 1
    monkeypatch.setattr(pipeline, "_park_dtype", lambda source: None)
    plain = compress_source(InMemorySource(build_model("qwen2_moe", layers=4, dtype=torch.bfloat16)), CharTokenizer(),
                            calibration_texts(), config, sink=plain_sink, progress=False)
    assert widest["float32 layers"] == 2
    assert parked["layers"] == plain["layers"]
    for key, value in plain_sink.tensors.items():
        assert torch.equal(parked_sink.tensors[key], value), key
