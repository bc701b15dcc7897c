import os
import pathlib

import moei2

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_imports_installed_package_not_checkout():
    if not os.environ.get("MOEI2_TEST_INSTALLED"):
        return
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
    import pytest

    with pytest.raises(ValueError, match="num_threads"):
        moei2.set_blas_threads(0)
