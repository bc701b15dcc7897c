/* Argument checks and status translation shared by the glue files. */
#include "glue.h"

#include <math.h>
#include <stdio.h>

PyArrayObject *glue_check_array(PyObject *obj, const char *name, int dtype, int ndim, int writeable) {
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
    if (!PyArray_ISALIGNED(arr) || PyArray_ISBYTESWAPPED(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned and in native byte order", name);
        return NULL;
    }
    if (writeable && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable", name);
        return NULL;
    }
    return arr;
}

int glue_check_finite(PyArrayObject *arr, const char *name) {
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

int glue_check_shape2(PyArrayObject *arr, const char *name, npy_intp rows, npy_intp cols) {
    if (PyArray_DIM(arr, 0) != rows || PyArray_DIM(arr, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd), got (%zd, %zd)", name, (Py_ssize_t)rows,
                     (Py_ssize_t)cols, (Py_ssize_t)PyArray_DIM(arr, 0), (Py_ssize_t)PyArray_DIM(arr, 1));
        return -1;
    }
    return 0;
}

int glue_arrays_overlap(PyArrayObject *x, PyArrayObject *y) {
    const char *a0 = (const char *)PyArray_DATA(x), *b0 = (const char *)PyArray_DATA(y);
    const char *a1 = a0 + PyArray_NBYTES(x), *b1 = b0 + PyArray_NBYTES(y);
    return PyArray_NBYTES(x) > 0 && PyArray_NBYTES(y) > 0 && a0 < b1 && b0 < a1;
}

int glue_int64(PyObject *obj, const char *name, int64_t low, int64_t high, int64_t *out) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *index = PyNumber_Index(obj);
    if (!index) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < low || v > high) {
        PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %S", name, (long long)low, (long long)high,
                     obj);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

int glue_threads(PyObject *obj, int *out) {
    int64_t v;
    if (glue_int64(obj, "num_threads", 1, 4096, &v) < 0) return -1;
    *out = (int)v;
    return 0;
}

int glue_double(PyObject *obj, const char *name, double *out) {
    if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyIndex_Check(obj))) {
        PyErr_Format(PyExc_TypeError, "%s must be a number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(v)) {
        char buf[32];
        PyErr_Format(PyExc_ValueError, "%s must be finite, got %s", name, glue_fmt(buf, sizeof buf, v));
        return -1;
    }
    *out = v;
    return 0;
}

const char *glue_fmt(char *buf, size_t size, double value) {
    snprintf(buf, size, "%.6g", value);
    return buf;
}

PyObject *glue_raise_status(moei2_status status, const char *what) {
    switch (status) {
    case MOEI2_ERR_NOMEM:
        return PyErr_Format(PyExc_MemoryError, "%s: out of memory (or a size that overflows)", what);
    case MOEI2_ERR_ARG:
        return PyErr_Format(PyExc_ValueError, "%s: invalid argument", what);
    case MOEI2_ERR_NONFINITE:
        return PyErr_Format(PyExc_ValueError, "%s: non-finite value (NaN or Inf) in input or result", what);
    default:
        return PyErr_Format(PyExc_RuntimeError, "%s: %s", what, moei2_status_string(status));
    }
}
