"""Imports the compiled core, making the BLAS it was linked against loadable first."""
import ctypes
import importlib
import os


def _preload_wheel_openblas():
    # When moei2 was linked against the scipy-openblas32 wheel, the extension's rpath points at
    # ../scipy_openblas32/lib; loading the library by path here also covers installs where the
    # two packages ended up in different site directories.
    try:
        import scipy_openblas32
    except ImportError:
        return
    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def load_core():
    _preload_wheel_openblas()
    try:
        return importlib.import_module("moei2._core")
    except ImportError as exc:
        raise ImportError(
            "moei2's C extension could not be imported. If you are running from a source checkout, "
            "install the package first (pip install .) and run from another directory. "
            f"Original error: {exc}"
        ) from exc
