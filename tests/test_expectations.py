"""The pipeline's choices on the tiny models equal the recorded ones (tests/expectations/).

Masks, KT choices and ranks must match exactly; losses and logits to a tight tolerance (they
depend on BLAS summation order). A deliberate change of the method regenerates the record
(tests/expectations/regenerate.py) and the diff is reviewed.
"""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from .expectations.regenerate import MODES, PATH, run_case  # noqa: E402
from .tiny_models import FAMILIES  # noqa: E402

RECORDED = json.loads(PATH.read_text())


def test_every_family_and_mode_is_recorded():
    assert sorted(RECORDED) == sorted(f"{f}/{m}" for f in FAMILIES for m in MODES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_reproduces_the_recorded_run(family, mode):
    expected, got = RECORDED[f"{family}/{mode}"], run_case(family, mode)
    assert sorted(got["layers"]) == sorted(expected["layers"])
    for l, want in expected["layers"].items():
        have = got["layers"][l]
        for key in ("prune_count", "candidates", "chosen_candidate", "dropped", "ranks"):
            assert have[key] == want[key], (l, key)
        for key in ("importance", "candidate_losses", "lowrank_losses"):
            np.testing.assert_allclose(have[key], want[key], rtol=1e-6, err_msg=f"layer {l} {key}")
    assert len(got["blocks"]) == len(expected["blocks"])
    for have, want in zip(got["blocks"], expected["blocks"]):
        for key in ("layers", "choice", "combinations"):
            assert have[key] == want[key], key
        if want["losses"] != [None]:
            np.testing.assert_allclose(have["losses"], want["losses"], rtol=1e-5)
    assert got["parameters"] == expected["parameters"]
    np.testing.assert_allclose(got["last_logits"], expected["last_logits"], rtol=1e-5, atol=1e-5)
