"""Build of the C extension ``moei2._core``.

BLAS/LAPACKE discovery, first match wins:

1. Environment override: ``MOEI2_BLAS_INCLUDE`` (include dirs), ``MOEI2_BLAS_LIBDIR``
   (library dirs), ``MOEI2_BLAS_LIBS`` (library names, default ``openblas``) and
   ``MOEI2_BLAS_PREFIX`` (symbol prefix, default none), all ``os.pathsep``/comma separated.
   ``MOEI2_BLAS=pkgconfig`` or ``MOEI2_BLAS=wheel`` forces one of the routes below.
2. pkg-config: system ``openblas`` plus ``lapacke`` (Debian: ``libopenblas-dev liblapacke-dev``).
3. The ``scipy-openblas32`` wheel, whose symbols carry the ``scipy_`` prefix; it then becomes a
   runtime dependency, found through an ``$ORIGIN``-relative rpath.
"""
import os
import shlex
import subprocess
import sys

import numpy
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BASE_DEPENDENCIES = ["numpy>=1.24"]

INSTALL_HINT = (
    "moei2 needs OpenBLAS with LAPACKE to build. Any one of these works:\n"
    "  * pip install scipy-openblas32   (then build without --no-build-isolation, or with it installed)\n"
    "  * apt-get install libopenblas-dev liblapacke-dev pkg-config\n"
    "  * set MOEI2_BLAS_INCLUDE, MOEI2_BLAS_LIBDIR, MOEI2_BLAS_LIBS (and MOEI2_BLAS_PREFIX if the\n"
    "    library prefixes its symbols) to point at your own build."
)


def _split(value):
    return [p for chunk in value.split(os.pathsep) for p in chunk.split(",") if p]


def _from_environment():
    if not any(os.environ.get(k) for k in ("MOEI2_BLAS_INCLUDE", "MOEI2_BLAS_LIBDIR", "MOEI2_BLAS_LIBS")):
        return None
    libdirs = _split(os.environ.get("MOEI2_BLAS_LIBDIR", ""))
    return {
        "route": "environment",
        "include_dirs": _split(os.environ.get("MOEI2_BLAS_INCLUDE", "")),
        "library_dirs": libdirs,
        "libraries": _split(os.environ.get("MOEI2_BLAS_LIBS", "openblas")),
        "runtime_library_dirs": libdirs,
        "prefix": os.environ.get("MOEI2_BLAS_PREFIX", ""),
        "extra_compile_args": [],
        "extra_link_args": [],
        "requires": [],
    }


def _pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _from_pkg_config():
    if _pkg_config("--exists", "openblas", "lapacke") is None:
        return None
    cflags = shlex.split(_pkg_config("--cflags", "openblas", "lapacke") or "")
    libs = shlex.split(_pkg_config("--libs", "openblas", "lapacke") or "")
    return {
        "route": "pkg-config",
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "libraries": [f[2:] for f in libs if f.startswith("-l")],
        "runtime_library_dirs": [],
        "prefix": "",
        "extra_compile_args": [f for f in cflags if not f.startswith("-I")],
        "extra_link_args": [f for f in libs if not f.startswith(("-L", "-l"))],
        "requires": [],
    }


def _from_wheel():
    try:
        import scipy_openblas32
    except ImportError:
        return None
    libdir = scipy_openblas32.get_lib_dir()
    version = getattr(scipy_openblas32, "__version__", "0")
    return {
        "route": "scipy-openblas32",
        "include_dirs": [scipy_openblas32.get_include_dir()],
        "library_dirs": [libdir],
        "libraries": [scipy_openblas32.get_library()],
        # The wheel lives beside moei2 in site-packages at run time; moei2/__init__.py also
        # preloads it, which covers installs where the two land in different directories.
        "runtime_library_dirs": [],
        "prefix": "scipy_",
        "extra_compile_args": [],
        "extra_link_args": ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"],
        "requires": [f"scipy-openblas32>={version.rsplit('.', 1)[0]}" if version != "0" else "scipy-openblas32"],
    }


def discover_blas():
    forced = os.environ.get("MOEI2_BLAS", "").strip().lower()
    routes = {"environment": _from_environment, "pkgconfig": _from_pkg_config, "wheel": _from_wheel}
    if forced:
        if forced not in routes:
            sys.exit(f"MOEI2_BLAS={forced!r} is not one of {sorted(routes)}")
        found = routes[forced]()
        if found is None:
            sys.exit(f"MOEI2_BLAS={forced!r} was requested but that route found nothing.\n{INSTALL_HINT}")
        return found
    for probe in (_from_environment, _from_pkg_config, _from_wheel):
        found = probe()
        if found is not None:
            return found
    sys.exit(f"No BLAS/LAPACKE found.\n{INSTALL_HINT}")


blas = discover_blas()
# The kernels (csrc/*.c, which know nothing of Python) and the glue (csrc/glue/*.c).
sources = sorted(
    os.path.join(folder, name)
    for folder in ("csrc", os.path.join("csrc", "glue"))
    for name in os.listdir(os.path.join(HERE, folder))
    if name.endswith(".c")
)
define_macros = [
    ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
    ("MOEI2_BLAS_ROUTE", '"%s"' % blas["route"]),
]
if blas["prefix"]:
    define_macros.append(("BLAS_SYMBOL_PREFIX", blas["prefix"]))

core = Extension(
    "moei2._core",
    sources=sources,
    include_dirs=["csrc", os.path.join("csrc", "glue"), numpy.get_include(), *blas["include_dirs"]],
    library_dirs=blas["library_dirs"],
    libraries=[*blas["libraries"], "m", "pthread"],
    runtime_library_dirs=blas["runtime_library_dirs"],
    define_macros=define_macros,
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", *blas["extra_compile_args"]],
    extra_link_args=blas["extra_link_args"],
)

setup(ext_modules=[core], install_requires=BASE_DEPENDENCIES + blas["requires"])
