/* The only file that knows about Python: argument parsing and checking, GIL release around
 * the kernels, and translation of moei2_status into Python exceptions.
 *
 * Every array argument is checked here (type, dtype, rank, shape, contiguity, writeability,
 * finiteness where the kernel assumes it) so the kernels can trust their inputs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include <math.h>
#include <string.h>

#include "moei2_core.h"

#ifndef MOEI2_BLAS_ROUTE
#define MOEI2_BLAS_ROUTE "unknown"
#endif

/* ---- shared argument checks ---------------------------------------------------------- */

/* Returns a borrowed view of obj as an ndarray after checking it, or NULL with an exception
 * naming the argument. dtype < 0 accepts float32 or float64; ndim < 0 accepts any rank. */
static PyArrayObject *check_array(PyObject *obj, const char *name, int dtype, int ndim, int writeable) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    int t = PyArray_TYPE(arr);
    if (dtype >= 0 && t != dtype) {
        PyArray_Descr *want = PyArray_DescrFromType(dtype);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(arr));
        Py_XDECREF(want);
        return NULL;
    }
    if (dtype < 0 && t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 or float64, got %S", name,
                     (PyObject *)PyArray_DESCR(arr));
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(arr) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-dimensional, got %d dimensions", name, ndim,
                     PyArray_NDIM(arr));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)", name);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return NULL;
    }
    return arr;
}

/* 0 if every element is finite, else -1 with ValueError naming the argument. */
static int check_finite(PyArrayObject *arr, const char *name) {
    npy_intp n = PyArray_SIZE(arr);
    int bad = 0;
    if (PyArray_TYPE(arr) == NPY_FLOAT64) {
        const double *p = (const double *)PyArray_DATA(arr);
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp i = 0; i < n; i++) if (!isfinite(p[i])) { bad = 1; break; }
        Py_END_ALLOW_THREADS
    } else if (PyArray_TYPE(arr) == NPY_FLOAT32) {
        const float *p = (const float *)PyArray_DATA(arr);
        Py_BEGIN_ALLOW_THREADS
        for (npy_intp i = 0; i < n; i++) if (!isfinite(p[i])) { bad = 1; break; }
        Py_END_ALLOW_THREADS
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf", name);
        return -1;
    }
    return 0;
}

/* Raises the Python exception matching a kernel status; returns NULL for convenience. */
static PyObject *raise_status(moei2_status status, const char *what) {
    switch (status) {
    case MOEI2_ERR_NOMEM:
        return PyErr_Format(PyExc_MemoryError, "%s: out of memory", what);
    case MOEI2_ERR_ARG:
        return PyErr_Format(PyExc_ValueError, "%s: invalid argument", what);
    case MOEI2_ERR_NONFINITE:
        return PyErr_Format(PyExc_ValueError, "%s: non-finite value (NaN or Inf) in input or result", what);
    default:
        return PyErr_Format(PyExc_RuntimeError, "%s: %s", what, moei2_status_string(status));
    }
}

/* ---- BLAS information ---------------------------------------------------------------- */

static PyObject *py_blas_info(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:s,s:s,s:s,s:i,s:i}", "route", MOEI2_BLAS_ROUTE, "config", moei2_blas_config(),
                         "corename", moei2_blas_corename(), "num_threads", moei2_blas_get_num_threads(),
                         "num_procs", moei2_blas_num_procs());
}

static PyObject *py_set_blas_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 4096) return PyErr_Format(PyExc_ValueError, "num_threads must be in [1, 4096], got %ld", n);
    int previous = moei2_blas_get_num_threads();
    moei2_blas_set_num_threads((int)n);
    return PyLong_FromLong(previous);
}

/* ==== lowrank: glue for lowrank.c ======================================================= */


/* ==== end lowrank ====================================================================== */



/* ==== search: glue for importance.c, fitness.c, genetic.c =============================== */


/* ==== end search ======================================================================= */



static PyMethodDef core_methods[] = {
    {"blas_info", py_blas_info, METH_NOARGS, "Which BLAS/LAPACK is linked: route, config, core, threads."},
    {"set_blas_threads", py_set_blas_threads, METH_O, "Set the BLAS thread count; returns the previous one."},
    /* ---- lowrank methods ---- */


    /* ---- end lowrank methods ---- */



    /* ---- search methods ---- */


    /* ---- end search methods ---- */
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "moei2._core", "moei2 C kernels (see csrc/moei2_core.h).", -1, core_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    return PyModule_Create(&core_module);
}
