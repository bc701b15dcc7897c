"""Corrupted headers, dtypes, shapes, offsets and configs read by both checkpoint readers, in a
subprocess: a refusal (ValueError, OSError) or the saved weights, never another exception, a
signal or a wrong model (see tests/fuzz_checkpoints.py). MOEI2_FUZZ_CASES runs more cases."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_checkpoints.py")
CASES = int(os.environ.get("MOEI2_FUZZ_CASES", "24"))


@pytest.mark.parametrize("seed", [0, 1])
def test_checkpoint_readers_survive_corruption(seed):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, SCRIPT, str(seed), str(CASES)], capture_output=True, text=True,
                          timeout=120 + 5 * CASES, env=env)
    last = proc.stderr.strip().splitlines()[-12:]
    assert proc.returncode == 0, f"exit {proc.returncode}; last cases:\n" + "\n".join(last)
    assert proc.stdout.strip() == f"ok {CASES}"
