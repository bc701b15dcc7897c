"""Reliability: a load never mixes two checkpoints, inputs are checked before they are trusted,
and every refusal comes before the long work."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moei2  # noqa: E402

from .tiny_models import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WRITER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    import moei2
    from tiny_models import build_model
    # A and B differ in every tensor and in config.json (rms_norm_eps).
    models = [build_model("mixtral", seed=s, rms_norm_eps=1e-6 * (s + 1)) for s in (0, 1)]
    target, deadline = sys.argv[2], time.monotonic() + float(sys.argv[3])
    n = 0
    while time.monotonic() < deadline:
        moei2.save(models[n % 2], target, overwrite=True, max_shard_bytes=4096)
        n += 1
        if n == 2:
            open(target + ".ready", "w").close()
    print(n)
""")


def _signature(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_never_mixes_two_checkpoints_under_a_replacing_writer(tmp_path):
    target = str(tmp_path / "ckpt")
    originals = [build_model("mixtral", seed=s, rms_norm_eps=1e-6 * (s + 1)) for s in (0, 1)]
    wanted = [_signature(m) for m in originals]
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, ROOT, target, "30"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(target + ".ready"):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        loads, mixed, stop = 0, [], time.monotonic() + 20
        while loads < 60 and time.monotonic() < stop:
            model = moei2.load(target, verify=loads % 2 == 0)
            got = model.state_dict()
            which = [i for i, want in enumerate(wanted)
                     if all(torch.equal(got[k], want[k]) for k in want)
                     and model.config.rms_norm_eps == originals[i].config.rms_norm_eps]
            if len(which) != 1:
                mixed.append(loads)
            loads += 1
    finally:
        writer.terminate()
        writer.wait(timeout=30)
    assert loads >= 10
    assert mixed == [], f"{len(mixed)} of {loads} loads mixed the two checkpoints"
