"""Random shapes, dtypes and extreme values at every public kernel entry point, in subprocesses:
an exception or an answer, never a signal (see tests/fuzz_kernels.py)."""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_kernels.py")


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_entries_survive_hostile_arguments(seed):
    proc = subprocess.run([sys.executable, SCRIPT, str(seed), "500"], capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-3:]
    assert proc.returncode == 0, f"exit {proc.returncode}; last calls: {last}"
    assert proc.stdout.strip() == "ok 500"
