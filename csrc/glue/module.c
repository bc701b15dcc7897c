/* The module moei2._core: BLAS information, and the glue pieces registered from
 * glue_lowrank.c (low-rank kernels) and glue_search.c (the SearchCache type). */
#define MOEI2_GLUE_MAIN
#include "glue.h"

#ifndef MOEI2_BLAS_ROUTE
#define MOEI2_BLAS_ROUTE "unknown"
#endif

static PyObject *py_blas_info(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:s,s:s,s:s,s:i,s:i}", "route", MOEI2_BLAS_ROUTE, "config", moei2_blas_config(),
                         "corename", moei2_blas_corename(), "num_threads", moei2_blas_get_num_threads(),
                         "num_procs", moei2_blas_num_procs());
}

static PyObject *py_set_blas_threads(PyObject *self, PyObject *arg) {
    int n;
    if (glue_threads(arg, &n) < 0) return NULL;
    int previous = moei2_blas_get_num_threads();
    moei2_blas_set_num_threads(n);
    return PyLong_FromLong(previous);
}

static PyMethodDef core_methods[] = {
    {"blas_info", py_blas_info, METH_NOARGS, "Which BLAS/LAPACK is linked: route, config, core, threads."},
    {"set_blas_threads", py_set_blas_threads, METH_O, "Set the BLAS thread count; returns the previous one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "moei2._core", "moei2 C kernels (see csrc/moei2_core.h).", -1, core_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    PyObject *module = PyModule_Create(&core_module);
    if (!module) return NULL;
    if (PyModule_AddFunctions(module, glue_lowrank_methods) < 0 ||
        PyModule_AddFunctions(module, glue_search_methods) < 0 || glue_search_add_types(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
