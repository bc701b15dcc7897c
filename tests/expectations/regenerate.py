"""Records what the compression pipeline chooses on the tiny models, for tests/test_expectations.py.

For every tiny family and both hidden-state modes of the search (``CompressionConfig.search_hidden``
"compressed" and "original"), the report's expert importance, candidate masks and their losses, KT choices
and losses, ranks and decomposition losses, the parameter counts, and the compressed model's last
logits on fixed ids are written to ``pipeline.json`` beside this file. The tests hold the
pipeline to them: masks, choices and ranks exactly, losses and logits to a tight tolerance.

A change of the method's numbers is a change of this file, reviewed like code:

    PYTHONPATH=. python -m tests.expectations.regenerate
    git diff --stat tests/expectations/pipeline.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moei2.pipeline import compress_source  # noqa: E402
from moei2.source import InMemorySource  # noqa: E402

from ..test_pipeline import CharTokenizer, calibration_texts, small_config  # noqa: E402
from ..tiny_models import FAMILIES, build_model  # noqa: E402

PATH = Path(__file__).with_name("pipeline.json")
MODES = ("compressed", "original")
LAYERS = 4


def logit_ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))


def run_case(family: str, mode: str) -> dict:
    """Compresses the tiny ``family`` model with the search on the ``mode`` hidden state; returns
    what is recorded of the run."""
    model = build_model(family, layers=LAYERS)
    report = compress_source(InMemorySource(model), CharTokenizer(), calibration_texts(),
                             small_config(search_hidden=mode), progress=False)
    with torch.no_grad():
        logits = model(input_ids=logit_ids()).logits[:, -1, :]
    layers = {}
    for l, info in report["layers"].items():
        layers[l] = {"importance": info["importance"], "prune_count": info["prune_count"],
                     "candidates": info["search"]["candidates"],
                     "candidate_losses": info["search"]["candidate_losses"],
                     "chosen_candidate": info["search"]["chosen_candidate"], "dropped": info["dropped"],
                     "ranks": info["lowrank"]["ranks"], "lowrank_losses": info["lowrank"]["losses"]}
    blocks = [{"layers": b["layers"], "choice": b["choice"], "combinations": b["combinations"],
               "losses": b["losses"]} for b in report["blocks"]]
    parameters = {k: v for k, v in report["parameters"].items() if isinstance(v, int)}
    return {"layers": layers, "blocks": blocks, "parameters": parameters, "last_logits": logits.tolist()}


def _dumps(value, indent: str = "") -> str:
    """JSON with one line per leaf list, so that a changed mask or loss is a one-line diff."""
    if isinstance(value, dict):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in sorted(value.items())]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def main() -> None:
    cases = {f"{family}/{mode}": run_case(family, mode) for family in FAMILIES for mode in MODES}
    PATH.write_text(_dumps(cases) + "\n")
    print(f"wrote {len(cases)} cases to {PATH}")


if __name__ == "__main__":
    main()
