import os
import pathlib

import pytest

import moei2

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tests_import_the_package_a_user_process_imports(run_python):
    """A process started outside the checkout (as a user's) imports the same moei2 as the tests,
    with its compiled core: the tests exercise what users run."""
    proc = run_python("-c", "import moei2; moei2.blas_info(); print(moei2.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert pathlib.Path(proc.stdout.strip()).resolve() == pathlib.Path(moei2.__file__).resolve()


@pytest.mark.skipif(not os.environ.get("MOEI2_TEST_INSTALLED"),
                    reason="MOEI2_TEST_INSTALLED=1 states that moei2 was installed from a wheel, not in place")
def test_imports_installed_package_not_checkout():
    assert REPO / "moei2" not in pathlib.Path(moei2.__file__).resolve().parents


def test_blas_info_reports_linked_library():
    info = moei2.blas_info()
    assert info["route"] in {"environment", "pkg-config", "scipy-openblas32"}
    assert "OpenBLAS" in info["config"]
    assert info["num_threads"] >= 1
    assert info["num_procs"] >= 1


def test_set_blas_threads_round_trip():
    before = moei2.set_blas_threads(1)
    try:
        assert moei2.blas_info()["num_threads"] == 1
    finally:
        moei2.set_blas_threads(before)
    assert moei2.blas_info()["num_threads"] == before


def test_set_blas_threads_rejects_zero():
    with pytest.raises(ValueError, match="num_threads"):
        moei2.set_blas_threads(0)


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports(script, monkeypatch):
    """The benchmarks run by hand, not in CI: at least what they import from moei2 must still exist."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", REPO / "benchmarks" / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
