/* Shared by the Python glue files (csrc/glue/): the only code that includes Python.h. Each
 * argument is checked once, by the helpers here or by the type that owns it, and every kernel
 * status becomes a Python exception naming what failed. */
#ifndef MOEI2_GLUE_H
#define MOEI2_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL moei2_ARRAY_API
#ifndef MOEI2_GLUE_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdint.h>

#include "moei2_core.h"

/* Returns obj as an ndarray after checking it, or NULL with an exception naming the argument.
 * dtype < 0 accepts float32 or float64; ndim < 0 any rank. */
PyArrayObject *glue_check_array(PyObject *obj, const char *name, int dtype, int ndim, int writeable);
/* 0 if every element of a float array is finite, else -1 with ValueError naming it. */
int glue_check_finite(PyArrayObject *arr, const char *name);
/* 0 if arr is rows x cols, else -1 with ValueError. */
int glue_check_shape2(PyArrayObject *arr, const char *name, npy_intp rows, npy_intp cols);
/* 1 when the byte ranges of two arrays overlap. */
int glue_arrays_overlap(PyArrayObject *x, PyArrayObject *y);
/* A Python integer (not a bool, not a float) in [low, high]; -1 with an exception naming it. */
int glue_int64(PyObject *obj, const char *name, int64_t low, int64_t high, int64_t *out);
/* A thread count in [1, 4096]. */
int glue_threads(PyObject *obj, int *out);
/* A Python float (or integer) that is finite; -1 with an exception naming it. */
int glue_double(PyObject *obj, const char *name, double *out);
/* Raises the exception of a kernel status; returns NULL. */
PyObject *glue_raise_status(moei2_status status, const char *what);
/* Formats a double with %.6g into buf (PyErr_Format has no %g). */
const char *glue_fmt(char *buf, size_t size, double value);

/* Registration of the pieces of the module. */
extern PyMethodDef glue_lowrank_methods[];
extern PyMethodDef glue_search_methods[];
int glue_search_add_types(PyObject *module);

#endif
