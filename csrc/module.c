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

/* 1 when the byte ranges of two arrays overlap. */
static int arrays_overlap(PyArrayObject *x, PyArrayObject *y) {
    const char *a0 = (const char *)PyArray_DATA(x), *b0 = (const char *)PyArray_DATA(y);
    const char *a1 = a0 + PyArray_NBYTES(x), *b1 = b0 + PyArray_NBYTES(y);
    return PyArray_NBYTES(x) > 0 && PyArray_NBYTES(y) > 0 && a0 < b1 && b0 < a1;
}

/* Reads a Python integer (not a bool, not a float) into *out; -1 with TypeError naming it. */
static int int64_arg(PyObject *obj, const char *name, int64_t *out) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        PyObject *index = PyNumber_Index(obj);
        if (!index) return -1;
        PyErr_Clear();
        v = PyLong_AsLongLong(index);
        Py_DECREF(index);
        if (v == -1 && PyErr_Occurred()) return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* Checks one (W, gram, rank, A, B) set and fills job; the Gram's sanity check runs here too.
 * `where` prefixes argument names ("" or "items[3]: "). Returns -1 with an exception. */
static int lowrank_job_from_args(PyObject *weight_obj, PyObject *gram_obj, PyObject *rank_obj, PyObject *a_obj,
                                 PyObject *b_obj, const char *where, moei2_lowrank_job *job) {
    char name[96];
    memset(job, 0, sizeof(*job));
#define NAME(arg) (snprintf(name, sizeof(name), "%s%s", where, arg), name)
    PyArrayObject *weight = check_array(weight_obj, NAME("W"), -1, 2, 0);
    if (!weight) return -1;
    npy_intp m = PyArray_DIM(weight, 0), n = PyArray_DIM(weight, 1);
    if (m < 1 || n < 1 || m > INT32_MAX || n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must have between 1 and %d rows and columns, got shape (%zd, %zd)",
                     NAME("W"), INT32_MAX, (Py_ssize_t)m, (Py_ssize_t)n);
        return -1;
    }
    int64_t rank;
    if (int64_arg(rank_obj, NAME("rank"), &rank) < 0) return -1;
    int64_t kmax = m < n ? m : n;
    if (rank < 1 || rank > kmax) {
        PyErr_Format(PyExc_ValueError, "%s must be in [1, min(m, n)] = [1, %lld] for weight of shape (%zd, %zd), got %lld",
                     NAME("rank"), (long long)kmax, (Py_ssize_t)m, (Py_ssize_t)n, (long long)rank);
        return -1;
    }
    int dtype = PyArray_TYPE(weight);
    PyArrayObject *gram = NULL;
    if (gram_obj != Py_None) {
        gram = check_array(gram_obj, NAME("gram"), NPY_FLOAT64, 2, 0);
        if (!gram) return -1;
        if (PyArray_DIM(gram, 0) != n || PyArray_DIM(gram, 1) != n) {
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd) to match the %zd columns of weight, got (%zd, %zd)",
                         NAME("gram"), (Py_ssize_t)n, (Py_ssize_t)n, (Py_ssize_t)n, (Py_ssize_t)PyArray_DIM(gram, 0),
                         (Py_ssize_t)PyArray_DIM(gram, 1));
            return -1;
        }
    }
    PyArrayObject *a = check_array(a_obj, NAME("A"), dtype, 2, 1);
    if (!a) return -1;
    PyArrayObject *b = check_array(b_obj, NAME("B"), dtype, 2, 1);
    if (!b) return -1;
    if (PyArray_DIM(a, 0) != m || PyArray_DIM(a, 1) != rank) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %lld), got (%zd, %zd)", NAME("A"), (Py_ssize_t)m,
                     (long long)rank, (Py_ssize_t)PyArray_DIM(a, 0), (Py_ssize_t)PyArray_DIM(a, 1));
        return -1;
    }
    if (PyArray_DIM(b, 0) != rank || PyArray_DIM(b, 1) != n) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%lld, %zd), got (%zd, %zd)", NAME("B"), (long long)rank,
                     (Py_ssize_t)n, (Py_ssize_t)PyArray_DIM(b, 0), (Py_ssize_t)PyArray_DIM(b, 1));
        return -1;
    }
    if (arrays_overlap(a, b) || arrays_overlap(a, weight) || arrays_overlap(b, weight) ||
        (gram && (arrays_overlap(a, gram) || arrays_overlap(b, gram)))) {
        PyErr_Format(PyExc_ValueError, "%s and %sB must not share memory with each other or with the inputs",
                     NAME("A"), where);
        return -1;
    }
    if (check_finite(weight, NAME("W")) < 0) return -1;
    if (gram) {
        if (check_finite(gram, NAME("gram")) < 0) return -1;
        int64_t row = 0, col = 0;
        int bad;
        const double *g = (const double *)PyArray_DATA(gram);
        Py_BEGIN_ALLOW_THREADS
        bad = moei2_lowrank_check_gram(g, (int64_t)n, &row, &col);
        Py_END_ALLOW_THREADS
        if (bad) {
            const char *what = bad == 1 ? "has a negative diagonal entry"
                               : bad == 2 ? "is not symmetric"
                                          : "violates |G_ij| <= sqrt(G_ii G_jj)";
            PyErr_Format(PyExc_ValueError, "%s is not a Gram matrix (X^T X): it %s at [%lld, %lld]", NAME("gram"), what,
                         (long long)row, (long long)col);
            return -1;
        }
    }
#undef NAME
    job->dtype = dtype == NPY_FLOAT32 ? MOEI2_FLOAT32 : MOEI2_FLOAT64;
    job->weight = PyArray_DATA(weight);
    job->rows = (int64_t)m;
    job->cols = (int64_t)n;
    job->gram = gram ? (const double *)PyArray_DATA(gram) : NULL;
    job->rank = rank;
    job->a = PyArray_DATA(a);
    job->b = PyArray_DATA(b);
    return 0;
}

static PyObject *lowrank_info_dict(const moei2_lowrank_job *job) {
    static const char *routes[] = {"left-gram", "qr"};
    static const char *solvers[] = {"dsytrd+dstemr", "dsyevd", "dsyev"};
    const moei2_lowrank_info *info = &job->info;
    char method[96];
    snprintf(method, sizeof(method), "%s/%s%s", routes[info->route == MOEI2_LOWRANK_ROUTE_QR],
             solvers[info->solver < MOEI2_EIG_COUNT ? info->solver : 0], info->whitened ? "" : " (plain svd)");
    PyObject *fallback = info->fallback[0] ? PyUnicode_FromString(info->fallback) : (Py_INCREF(Py_None), Py_None);
    if (!fallback) return NULL;
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:s,s:s,s:s,s:N,s:O,s:O,s:L}", "loss", info->loss, "energy", info->energy,
                         "min_eigenvalue", info->min_eigenvalue, "max_eigenvalue", info->max_eigenvalue, "method",
                         method, "route", routes[info->route == MOEI2_LOWRANK_ROUTE_QR], "solver",
                         solvers[info->solver < MOEI2_EIG_COUNT ? info->solver : 0], "fallback", fallback, "whitened",
                         info->whitened ? Py_True : Py_False, "gram_is_zero", info->gram_is_zero ? Py_True : Py_False,
                         "rank", (long long)job->rank);
}

/* Raises for a failed job or an indefinite Gram; `where` as in lowrank_job_from_args. */
static int lowrank_job_raise(const moei2_lowrank_job *job, const char *where) {
    if (job->status != MOEI2_OK) {
        if (job->status == MOEI2_ERR_LAPACK)
            PyErr_Format(PyExc_RuntimeError, "%sdecompose: every symmetric eigensolver failed (%s)", where,
                         job->info.fallback);
        else if (job->status == MOEI2_ERR_NONFINITE)
            PyErr_Format(PyExc_ValueError, "%sdecompose: W and gram are finite but W G W^T or the factors "
                         "overflow; rescale the inputs", where);
        else
            raise_status(job->status, "decompose");
        return -1;
    }
    if (job->info.indefinite) {
        PyErr_Format(PyExc_ValueError, "%sgram is not positive semidefinite: W G W^T has eigenvalue %g against a "
                     "largest of %g", where, job->info.min_eigenvalue, job->info.max_eigenvalue);
        return -1;
    }
    return 0;
}

static PyObject *py_lowrank_decompose(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"W", "gram", "rank", "A", "B", "skip_solvers", NULL};
    PyObject *weight, *gram, *rank, *a, *b;
    unsigned int skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|I", kwlist, &weight, &gram, &rank, &a, &b, &skip)) return NULL;
    moei2_lowrank_job job;
    if (lowrank_job_from_args(weight, gram, rank, a, b, "", &job) < 0) return NULL;
    job.skip_solvers = skip;
    Py_BEGIN_ALLOW_THREADS
    moei2_lowrank_decompose(&job);
    Py_END_ALLOW_THREADS
    if (lowrank_job_raise(&job, "") < 0) return NULL;
    return lowrank_info_dict(&job);
}

static PyObject *py_lowrank_decompose_many(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"items", "num_threads", "skip_solvers", NULL};
    PyObject *items_obj;
    int num_threads;
    unsigned int skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi|I", kwlist, &items_obj, &num_threads, &skip)) return NULL;
    if (num_threads < 1 || num_threads > 4096)
        return PyErr_Format(PyExc_ValueError, "num_threads must be in [1, 4096], got %d", num_threads);
    /* A tuple copy, so that nothing the workers read can be freed or replaced while the GIL is
     * released: the copy holds a reference to every item, and each item tuple to its arrays. */
    PyObject *items = PySequence_Tuple(items_obj);
    if (!items) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "items must be a sequence of (W, gram, rank, A, B) tuples, got %s",
                            Py_TYPE(items_obj)->tp_name);
    }
    Py_ssize_t count = PyTuple_GET_SIZE(items);
    moei2_lowrank_job *jobs = (moei2_lowrank_job *)PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(*jobs));
    PyObject *result = NULL;
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        char where[48];
        snprintf(where, sizeof(where), "items[%zd]: ", i);
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
            PyErr_Format(PyExc_TypeError, "items[%zd] must be a (W, gram, rank, A, B) tuple", i);
            goto done;
        }
        if (lowrank_job_from_args(PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1), PyTuple_GET_ITEM(item, 2),
                                  PyTuple_GET_ITEM(item, 3), PyTuple_GET_ITEM(item, 4), where, &jobs[i]) < 0)
            goto done;
        jobs[i].skip_solvers = skip;
    }
    /* Outputs of different items must not overlap anything of another item: the workers write
     * them concurrently. (Within an item this was checked above.) */
    for (Py_ssize_t i = 0; i < count; i++)
        for (Py_ssize_t j = 0; j < count; j++) {
            if (i == j) continue;
            PyObject *out_item = PyTuple_GET_ITEM(items, i), *other = PyTuple_GET_ITEM(items, j);
            static const int outputs[] = {3, 4}, arrays[] = {0, 1, 3, 4};
            for (int x = 0; x < 2; x++)
                for (int y = 0; y < 4; y++) {
                    PyObject *o = PyTuple_GET_ITEM(other, arrays[y]);
                    if (o != Py_None && arrays_overlap((PyArrayObject *)PyTuple_GET_ITEM(out_item, outputs[x]),
                                                       (PyArrayObject *)o)) {
                        PyErr_Format(PyExc_ValueError, "items[%zd] writes into memory of items[%zd]", i, j);
                        goto done;
                    }
                }
        }
    Py_BEGIN_ALLOW_THREADS
    moei2_lowrank_decompose_many(jobs, (int64_t)count, num_threads);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        char where[48];
        snprintf(where, sizeof(where), "items[%zd]: ", i);
        if (lowrank_job_raise(&jobs[i], where) < 0) goto done;
    }
    result = PyList_New(count);
    if (!result) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *info = lowrank_info_dict(&jobs[i]);
        if (!info) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, info);
    }
done:
    PyMem_Free(jobs);
    Py_DECREF(items);
    return result;
}

static PyObject *py_allocate_ranks(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"importance", "rows", "cols", "avg_rank", "keep_ratio", "alpha", "eps", NULL};
    PyObject *imp_obj, *rows_obj, *cols_obj, *avg_obj, *keep_obj;
    double alpha, eps;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOdd", kwlist, &imp_obj, &rows_obj, &cols_obj, &avg_obj,
                                     &keep_obj, &alpha, &eps))
        return NULL;
    PyArrayObject *imp = check_array(imp_obj, "importance", NPY_FLOAT64, 1, 0);
    if (!imp) return NULL;
    PyArrayObject *rows = check_array(rows_obj, "shapes rows", NPY_INT64, 1, 0);
    if (!rows) return NULL;
    PyArrayObject *cols = check_array(cols_obj, "shapes cols", NPY_INT64, 1, 0);
    if (!cols) return NULL;
    npy_intp count = PyArray_DIM(imp, 0);
    if (count < 1) return PyErr_Format(PyExc_ValueError, "importance must not be empty");
    if (PyArray_DIM(rows, 0) != count || PyArray_DIM(cols, 0) != count)
        return PyErr_Format(PyExc_ValueError, "shapes must have one (m, n) per expert: %zd importances, %zd shapes",
                            (Py_ssize_t)count, (Py_ssize_t)PyArray_DIM(rows, 0));
    if (check_finite(imp, "importance") < 0) return NULL;
    const double *iv = (const double *)PyArray_DATA(imp);
    const int64_t *rv = (const int64_t *)PyArray_DATA(rows), *cv = (const int64_t *)PyArray_DATA(cols);
    for (npy_intp j = 0; j < count; j++) {
        if (iv[j] < 0.0) return PyErr_Format(PyExc_ValueError, "importance must be >= 0, got %g at %zd", iv[j], (Py_ssize_t)j);
        if (rv[j] < 1 || cv[j] < 1 || rv[j] > INT32_MAX || cv[j] > INT32_MAX)
            return PyErr_Format(PyExc_ValueError, "shapes[%zd] must be positive and below 2^31, got (%lld, %lld)",
                                (Py_ssize_t)j, (long long)rv[j], (long long)cv[j]);
    }
    if (!(isfinite(alpha) && alpha >= 0.0)) return PyErr_Format(PyExc_ValueError, "alpha must be finite and >= 0, got %g", alpha);
    if (!(isfinite(eps) && eps >= 0.0)) return PyErr_Format(PyExc_ValueError, "eps must be finite and >= 0, got %g", eps);
    double avg = -1.0, keep = -1.0;
    if ((avg_obj == Py_None) == (keep_obj == Py_None))
        return PyErr_Format(PyExc_ValueError, "give exactly one of avg_rank and keep_ratio");
    if (avg_obj != Py_None) {
        avg = PyFloat_AsDouble(avg_obj);
        if (avg == -1.0 && PyErr_Occurred()) return NULL;
        if (!(isfinite(avg) && avg > 0.0)) return PyErr_Format(PyExc_ValueError, "avg_rank must be finite and > 0, got %g", avg);
    } else {
        keep = PyFloat_AsDouble(keep_obj);
        if (keep == -1.0 && PyErr_Occurred()) return NULL;
        if (!(isfinite(keep) && keep > 0.0 && keep <= 1.0))
            return PyErr_Format(PyExc_ValueError, "keep_ratio must be in (0, 1], got %g", keep);
    }
    npy_intp dims[1] = {count};
    PyArrayObject *ranks = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!ranks) return NULL;
    int64_t budget = 0, cap_sum = 0;
    moei2_status status = moei2_allocate_ranks(iv, rv, cv, (int64_t)count, avg, keep, alpha, eps,
                                               (int64_t *)PyArray_DATA(ranks), &budget, &cap_sum);
    if (status == MOEI2_ERR_ARG) {
        Py_DECREF(ranks);
        if (budget < (int64_t)count)
            return PyErr_Format(PyExc_ValueError, "the rank budget round(R_avg * M) = %lld is below the %zd experts: "
                                "every expert needs rank >= 1 (raise avg_rank or keep_ratio)", (long long)budget,
                                (Py_ssize_t)count);
        if (budget > cap_sum)
            return PyErr_Format(PyExc_ValueError, "the rank budget round(R_avg * M) = %lld exceeds %lld, the sum of the "
                                "caps floor(m n / (m + n)) beyond which a factorisation has more parameters than "
                                "the dense matrix (lower avg_rank or keep_ratio)", (long long)budget, (long long)cap_sum);
        return PyErr_Format(PyExc_ValueError, "allocate_ranks: the weights (I + eps)^alpha sum to zero or overflow; "
                            "use eps > 0");
    }
    if (status != MOEI2_OK) {
        Py_DECREF(ranks);
        return raise_status(status, "allocate_ranks");
    }
    return (PyObject *)ranks;
}

/* ==== end lowrank ====================================================================== */



/* ==== search: glue for importance.c, fitness.c, genetic.c =============================== */

/* Checks a 2-D array's shape; -1 with ValueError naming the argument. */
static int check_shape2(PyArrayObject *arr, const char *name, npy_intp rows, npy_intp cols) {
    if (PyArray_DIM(arr, 0) != rows || PyArray_DIM(arr, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd), got (%zd, %zd)", name, (Py_ssize_t)rows,
                     (Py_ssize_t)cols, (Py_ssize_t)PyArray_DIM(arr, 0), (Py_ssize_t)PyArray_DIM(arr, 1));
        return -1;
    }
    return 0;
}

/* search_prepare(logits f64[N,E], top_k, num_candidates, with_probs)
 *   -> (candidates i32[N,C], candidate_probs f64[N,C], probs f64[N,E] or None, topk_bits u64[N,W]) */
static PyObject *py_search_prepare(PyObject *self, PyObject *args) {
    PyObject *logits_obj;
    long long top_k, num_candidates;
    int with_probs;
    if (!PyArg_ParseTuple(args, "OLLp", &logits_obj, &top_k, &num_candidates, &with_probs)) return NULL;
    PyArrayObject *logits = check_array(logits_obj, "router_logits", NPY_FLOAT64, 2, 0);
    if (!logits || check_finite(logits, "router_logits")) return NULL;
    npy_intp N = PyArray_DIM(logits, 0), E = PyArray_DIM(logits, 1);
    if (top_k < 1 || num_candidates <= top_k || num_candidates > E)
        return PyErr_Format(PyExc_ValueError, "need 1 <= top_k < num_candidates <= num_experts, got top_k=%lld, "
                            "num_candidates=%lld, num_experts=%zd", top_k, num_candidates, (Py_ssize_t)E);
    npy_intp W = MOEI2_MASK_WORDS(E);
    npy_intp dc[2] = {N, (npy_intp)num_candidates}, dp[2] = {N, E}, db[2] = {N, W};
    PyArrayObject *cand = (PyArrayObject *)PyArray_ZEROS(2, dc, NPY_INT32, 0);
    PyArrayObject *cprob = (PyArrayObject *)PyArray_ZEROS(2, dc, NPY_FLOAT64, 0);
    PyArrayObject *probs = with_probs ? (PyArrayObject *)PyArray_ZEROS(2, dp, NPY_FLOAT64, 0) : NULL;
    PyArrayObject *bits = (PyArrayObject *)PyArray_ZEROS(2, db, NPY_UINT64, 0);
    if (!cand || !cprob || (with_probs && !probs) || !bits) goto fail;
    moei2_status status;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_prepare(N, E, top_k, num_candidates, PyArray_DATA(logits), PyArray_DATA(cand),
                                  PyArray_DATA(cprob), probs ? PyArray_DATA(probs) : NULL, PyArray_DATA(bits));
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        if (status == MOEI2_ERR_NONFINITE)
            PyErr_SetString(PyExc_ValueError, "router_logits: a candidate expert has softmax probability 0 "
                                              "(logits spread too wide for float64)");
        else
            raise_status(status, "search_prepare");
        goto fail;
    }
    PyObject *probs_out = probs ? (PyObject *)probs : (Py_INCREF(Py_None), Py_None);
    return Py_BuildValue("(NNNN)", cand, cprob, probs_out, bits);
fail:
    Py_XDECREF(cand);
    Py_XDECREF(cprob);
    Py_XDECREF(probs);
    Py_XDECREF(bits);
    return NULL;
}

/* search_factor(outputs f32|f64[n,C,d], top_k, renormalize, scaling, candidate_probs f64[n,C],
 *               factor out f64[n,P], output_norm2 out f64[n]) -> None */
static PyObject *py_search_factor(PyObject *self, PyObject *args) {
    PyObject *out_obj, *cp_obj, *factor_obj, *norm_obj;
    long long top_k;
    int renormalize;
    double scaling;
    if (!PyArg_ParseTuple(args, "OLpdOOO", &out_obj, &top_k, &renormalize, &scaling, &cp_obj, &factor_obj, &norm_obj))
        return NULL;
    PyArrayObject *outputs = check_array(out_obj, "expert_outputs", -1, 3, 0);
    if (!outputs || check_finite(outputs, "expert_outputs")) return NULL;
    npy_intp n = PyArray_DIM(outputs, 0), C = PyArray_DIM(outputs, 1), d = PyArray_DIM(outputs, 2);
    PyArrayObject *cp = check_array(cp_obj, "candidate_probs", NPY_FLOAT64, 2, 0);
    if (!cp || check_shape2(cp, "candidate_probs", n, C)) return NULL;
    PyArrayObject *factor = check_array(factor_obj, "factor", NPY_FLOAT64, 2, 1);
    if (!factor || check_shape2(factor, "factor", n, MOEI2_PACKED_SIZE(C))) return NULL;
    PyArrayObject *norm = check_array(norm_obj, "output_norm2", NPY_FLOAT64, 1, 1);
    if (!norm) return NULL;
    if (PyArray_DIM(norm, 0) != n) return PyErr_Format(PyExc_ValueError, "output_norm2 must have length %zd", (Py_ssize_t)n);
    if (top_k < 1 || top_k > C || d < 1)
        return PyErr_Format(PyExc_ValueError, "expert_outputs must be [tokens, candidates >= top_k, dim >= 1]");
    int f32 = PyArray_TYPE(outputs) == NPY_FLOAT32;
    moei2_status status;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_factor(n, C, d, f32 ? PyArray_DATA(outputs) : NULL, f32 ? NULL : PyArray_DATA(outputs),
                                 top_k, renormalize, scaling, PyArray_DATA(cp), PyArray_DATA(factor), PyArray_DATA(norm));
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) return raise_status(status, "search_factor");
    Py_RETURN_NONE;
}

/* The cache travels as a tuple (top_k, renormalize, scaling, batch_ends, candidates,
 * candidate_probs, probs or None, topk_bits, factor, output_norm2), all owned by the Python
 * Layer; this fills a moei2_search_cache of borrowed pointers after checking every shape. */
static int parse_cache(PyObject *tuple, moei2_search_cache *cache) {
    long long top_k;
    int renormalize;
    double scaling;
    PyObject *ends_o, *cand_o, *cp_o, *probs_o, *bits_o, *factor_o, *norm_o;
    if (!PyArg_ParseTuple(tuple, "LpdOOOOOOO;cache must be a 10-tuple", &top_k, &renormalize, &scaling, &ends_o,
                          &cand_o, &cp_o, &probs_o, &bits_o, &factor_o, &norm_o))
        return -1;
    PyArrayObject *cand = check_array(cand_o, "candidates", NPY_INT32, 2, 0);
    if (!cand) return -1;
    npy_intp N = PyArray_DIM(cand, 0), C = PyArray_DIM(cand, 1);
    PyArrayObject *bits = check_array(bits_o, "topk_bits", NPY_UINT64, 2, 0);
    if (!bits) return -1;
    npy_intp W = PyArray_DIM(bits, 1);
    PyArrayObject *cp = check_array(cp_o, "candidate_probs", NPY_FLOAT64, 2, 0);
    PyArrayObject *factor = check_array(factor_o, "factor", NPY_FLOAT64, 2, 0);
    PyArrayObject *norm = check_array(norm_o, "output_norm2", NPY_FLOAT64, 1, 0);
    PyArrayObject *ends = check_array(ends_o, "batch_ends", NPY_INT64, 1, 0);
    if (!cp || !factor || !norm || !ends) return -1;
    if (check_shape2(cp, "candidate_probs", N, C) || check_shape2(factor, "factor", N, MOEI2_PACKED_SIZE(C)) ||
        PyArray_DIM(bits, 0) != N || PyArray_DIM(norm, 0) != N) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "cache arrays disagree on the number of tokens");
        return -1;
    }
    PyArrayObject *probs = NULL;
    npy_intp E;
    if (probs_o != Py_None) {
        probs = check_array(probs_o, "probs", NPY_FLOAT64, 2, 0);
        if (!probs) return -1;
        E = PyArray_DIM(probs, 1);
        if (PyArray_DIM(probs, 0) != N) {
            PyErr_SetString(PyExc_ValueError, "probs must have one row per token");
            return -1;
        }
    } else {
        if (!renormalize) {
            PyErr_SetString(PyExc_ValueError, "probs is required when the router does not renormalise");
            return -1;
        }
        E = W * 64; /* refined below from the caller's num_experts */
    }
    npy_intp nb = PyArray_DIM(ends, 0);
    const int64_t *e = PyArray_DATA(ends);
    if (nb < 1 || e[nb - 1] != N) {
        PyErr_SetString(PyExc_ValueError, "batch_ends must be non-empty and end at the number of tokens");
        return -1;
    }
    for (npy_intp b = 0; b < nb; b++)
        if (e[b] <= (b ? e[b - 1] : 0)) {
            PyErr_SetString(PyExc_ValueError, "batch_ends must be strictly increasing and positive");
            return -1;
        }
    if (top_k < 1 || C <= top_k) {
        PyErr_SetString(PyExc_ValueError, "cache needs 1 <= top_k < num_candidates");
        return -1;
    }
    cache->num_tokens = N;
    cache->num_experts = E;
    cache->top_k = top_k;
    cache->num_candidates = C;
    cache->renormalize = renormalize;
    cache->scaling = scaling;
    cache->num_batches = nb;
    cache->batch_ends = e;
    cache->candidates = PyArray_DATA(cand);
    cache->candidate_probs = PyArray_DATA(cp);
    cache->probs = probs ? PyArray_DATA(probs) : NULL;
    cache->topk_bits = PyArray_DATA(bits);
    cache->factor = PyArray_DATA(factor);
    cache->output_norm2 = PyArray_DATA(norm);
    return 0;
}

/* Every search entry point takes (cache, num_experts, ...): num_experts fixes E when probs is
 * absent and is checked against the arrays otherwise. */
static int parse_cache_experts(PyObject *tuple, long long num_experts, moei2_search_cache *cache) {
    if (parse_cache(tuple, cache)) return -1;
    if (cache->probs) {
        if (cache->num_experts != num_experts) {
            PyErr_SetString(PyExc_ValueError, "num_experts disagrees with probs");
            return -1;
        }
    }
    if (num_experts < cache->num_candidates || MOEI2_MASK_WORDS(num_experts) != (cache->num_experts + 63) / 64) {
        PyErr_SetString(PyExc_ValueError, "num_experts disagrees with the cache");
        return -1;
    }
    cache->num_experts = num_experts;
    return 0;
}

/* search_loss(cache, num_experts, masks u64[M,W], num_threads) -> f64[M] */
static PyObject *py_search_loss(PyObject *self, PyObject *args) {
    PyObject *cache_o, *masks_o;
    long long E;
    int threads;
    if (!PyArg_ParseTuple(args, "OLOi", &cache_o, &E, &masks_o, &threads)) return NULL;
    moei2_search_cache cache;
    if (parse_cache_experts(cache_o, E, &cache)) return NULL;
    PyArrayObject *masks = check_array(masks_o, "masks", NPY_UINT64, 2, 0);
    if (!masks || check_shape2(masks, "masks", PyArray_DIM(masks, 0), MOEI2_MASK_WORDS(E))) return NULL;
    npy_intp M = PyArray_DIM(masks, 0);
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(1, &M, NPY_FLOAT64, 0);
    if (!losses) return NULL;
    moei2_status status;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_loss(&cache, PyArray_DATA(masks), M, threads, PyArray_DATA(losses));
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        Py_DECREF(losses);
        if (status == MOEI2_ERR_ARG)
            return PyErr_Format(PyExc_ValueError, "masks: each mask may drop at most %lld experts (r_max) and no "
                                "expert index >= %lld", (long long)(cache.num_candidates - cache.top_k), E);
        return raise_status(status, "search_loss");
    }
    return (PyObject *)losses;
}

/* search_importance(cache, num_experts, num_threads) -> f64[E] */
static PyObject *py_search_importance(PyObject *self, PyObject *args) {
    PyObject *cache_o;
    long long E;
    int threads;
    if (!PyArg_ParseTuple(args, "OLi", &cache_o, &E, &threads)) return NULL;
    moei2_search_cache cache;
    if (parse_cache_experts(cache_o, E, &cache)) return NULL;
    npy_intp n = E;
    PyArrayObject *imp = (PyArrayObject *)PyArray_ZEROS(1, &n, NPY_FLOAT64, 0);
    if (!imp) return NULL;
    moei2_status status;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_expert_importance(&cache, threads, PyArray_DATA(imp));
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        Py_DECREF(imp);
        return raise_status(status, "expert_importance");
    }
    return (PyObject *)imp;
}

/* The cache of a subset search dropping r experts: r may not exceed what re-routing can reach
 * (num_candidates - top_k) nor leave fewer than top_k experts. Returns -1 with an exception set. */
static int parse_search_cache(PyObject *cache_o, long long E, long long r, moei2_search_cache *cache) {
    if (parse_cache_experts(cache_o, E, cache)) return -1;
    long long r_max = cache->num_candidates - cache->top_k;
    if (E - cache->top_k < r_max) r_max = E - cache->top_k;
    if (r < 0 || r > r_max) {
        PyErr_Format(PyExc_ValueError, "r must be in [0, %lld], got %lld", r_max, r);
        return -1;
    }
    return 0;
}

/* search_greedy(cache, num_experts, r, num_threads) -> (mask u64[W], step_best, step_mean, evaluations) */
static PyObject *py_search_greedy(PyObject *self, PyObject *args) {
    PyObject *cache_o;
    long long E, r;
    int threads;
    if (!PyArg_ParseTuple(args, "OLLi", &cache_o, &E, &r, &threads)) return NULL;
    moei2_search_cache cache;
    if (parse_search_cache(cache_o, E, r, &cache)) return NULL;
    npy_intp W = MOEI2_MASK_WORDS(E), rn = r;
    PyArrayObject *mask = (PyArrayObject *)PyArray_ZEROS(1, &W, NPY_UINT64, 0);
    PyArrayObject *best = (PyArrayObject *)PyArray_ZEROS(1, &rn, NPY_FLOAT64, 0);
    PyArrayObject *mean = (PyArrayObject *)PyArray_ZEROS(1, &rn, NPY_FLOAT64, 0);
    int64_t evaluations = 0;
    moei2_status status = MOEI2_ERR_NOMEM;
    if (mask && best && mean) {
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_greedy(&cache, r, threads, PyArray_DATA(mask), PyArray_DATA(best), PyArray_DATA(mean),
                                     &evaluations);
        Py_END_ALLOW_THREADS
    }
    if (status != MOEI2_OK) {
        Py_XDECREF(mask);
        Py_XDECREF(best);
        Py_XDECREF(mean);
        return raise_status(status, "greedy");
    }
    return Py_BuildValue("(NNNL)", mask, best, mean, (long long)evaluations);
}

/* Shared ending of the subset searches: raises on failure (releasing the arrays), otherwise
 * trims the result arrays to what was found. */
static PyObject *search_result_tuple(moei2_status status, const char *what, PyArrayObject *masks,
                                     PyArrayObject *losses, PyArrayObject *hbest, PyArrayObject *hmean,
                                     const moei2_search_result *res) {
    if (status != MOEI2_OK) {
        Py_XDECREF(masks);
        Py_XDECREF(losses);
        Py_XDECREF(hbest);
        Py_XDECREF(hmean);
        return raise_status(status, what);
    }
    PyObject *m = PySequence_GetSlice((PyObject *)masks, 0, res->found);
    PyObject *l = PySequence_GetSlice((PyObject *)losses, 0, res->found);
    PyObject *hb = PySequence_GetSlice((PyObject *)hbest, 0, res->history_length);
    PyObject *hm = PySequence_GetSlice((PyObject *)hmean, 0, res->history_length);
    Py_DECREF(masks);
    Py_DECREF(losses);
    Py_DECREF(hbest);
    Py_DECREF(hmean);
    if (!m || !l || !hb || !hm) {
        Py_XDECREF(m);
        Py_XDECREF(l);
        Py_XDECREF(hb);
        Py_XDECREF(hm);
        return NULL;
    }
    return Py_BuildValue("(NNNNL)", m, l, hb, hm, (long long)res->evaluations);
}

/* search_exhaustive(cache, num_experts, r, k_best, num_threads)
 *   -> (masks u64[K,W], losses, history_best[0], history_mean[0], evaluations) */
static PyObject *py_search_exhaustive(PyObject *self, PyObject *args) {
    PyObject *cache_o;
    long long E, r, k_best;
    int threads;
    if (!PyArg_ParseTuple(args, "OLLLi", &cache_o, &E, &r, &k_best, &threads)) return NULL;
    moei2_search_cache cache;
    if (parse_search_cache(cache_o, E, r, &cache)) return NULL;
    if (k_best < 1) return PyErr_Format(PyExc_ValueError, "k_best must be >= 1, got %lld", k_best);
    uint64_t total = moei2_combinations(E, r);
    if (k_best > (long long)total) k_best = (long long)total;
    npy_intp dm[2] = {k_best, MOEI2_MASK_WORDS(E)}, dk = k_best, zero = 0;
    PyArrayObject *masks = (PyArrayObject *)PyArray_ZEROS(2, dm, NPY_UINT64, 0);
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(1, &dk, NPY_FLOAT64, 0);
    PyArrayObject *hb = (PyArrayObject *)PyArray_ZEROS(1, &zero, NPY_FLOAT64, 0);
    PyArrayObject *hm = (PyArrayObject *)PyArray_ZEROS(1, &zero, NPY_FLOAT64, 0);
    moei2_search_result res = {0};
    moei2_status status = MOEI2_ERR_NOMEM;
    if (masks && losses && hb && hm) {
        res.masks = PyArray_DATA(masks);
        res.losses = PyArray_DATA(losses);
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_exhaustive(&cache, r, k_best, threads, &res);
        Py_END_ALLOW_THREADS
    }
    return search_result_tuple(status, "exhaustive", masks, losses, hb, hm, &res);
}

/* search_genetic(cache, num_experts, r, k_best, population, generations, elite_count,
 *                mutation_rate, seed, num_threads) -> like search_exhaustive */
static PyObject *py_search_genetic(PyObject *self, PyObject *args) {
    PyObject *cache_o;
    long long E, r, k_best, population, generations, elite;
    double mutation_rate;
    unsigned long long seed;
    int threads;
    if (!PyArg_ParseTuple(args, "OLLLLLLdKi", &cache_o, &E, &r, &k_best, &population, &generations, &elite,
                          &mutation_rate, &seed, &threads))
        return NULL;
    moei2_search_cache cache;
    if (parse_search_cache(cache_o, E, r, &cache)) return NULL;
    if (k_best < 1 || population < 2 || generations < 1 || elite < 1 || elite > population ||
        !(mutation_rate >= 0.0 && mutation_rate <= 1.0))
        return PyErr_Format(PyExc_ValueError, "genetic: need k_best >= 1, population >= 2, generations >= 1, "
                            "1 <= elite_count <= population and mutation_rate in [0, 1]");
    npy_intp dm[2] = {k_best, MOEI2_MASK_WORDS(E)}, dk = k_best, dg = generations;
    PyArrayObject *masks = (PyArrayObject *)PyArray_ZEROS(2, dm, NPY_UINT64, 0);
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(1, &dk, NPY_FLOAT64, 0);
    PyArrayObject *hb = (PyArrayObject *)PyArray_ZEROS(1, &dg, NPY_FLOAT64, 0);
    PyArrayObject *hm = (PyArrayObject *)PyArray_ZEROS(1, &dg, NPY_FLOAT64, 0);
    moei2_search_result res = {0};
    moei2_status status = MOEI2_ERR_NOMEM;
    if (masks && losses && hb && hm) {
        res.masks = PyArray_DATA(masks);
        res.losses = PyArray_DATA(losses);
        res.history_best = PyArray_DATA(hb);
        res.history_mean = PyArray_DATA(hm);
        moei2_genetic_params params = {r, population, generations, elite, mutation_rate, k_best, threads};
        moei2_rng rng;
        moei2_rng_seed(&rng, (uint64_t)seed);
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_genetic(&cache, &params, &rng, &res);
        Py_END_ALLOW_THREADS
    }
    return search_result_tuple(status, "genetic", masks, losses, hb, hm, &res);
}


/* ==== end search ======================================================================= */



static PyMethodDef core_methods[] = {
    {"blas_info", py_blas_info, METH_NOARGS, "Which BLAS/LAPACK is linked: route, config, core, threads."},
    {"set_blas_threads", py_set_blas_threads, METH_O, "Set the BLAS thread count; returns the previous one."},
    /* ---- lowrank methods ---- */
    {"lowrank_decompose", (PyCFunction)(void (*)(void))py_lowrank_decompose, METH_VARARGS | METH_KEYWORDS,
     "lowrank_decompose(W, gram, rank, A, B, skip_solvers=0) -> info: fills A, B (see moei2.lowrank)."},
    {"lowrank_decompose_many", (PyCFunction)(void (*)(void))py_lowrank_decompose_many, METH_VARARGS | METH_KEYWORDS,
     "lowrank_decompose_many(items, num_threads, skip_solvers=0) -> [info]: items of (W, gram, rank, A, B)."},
    {"allocate_ranks", (PyCFunction)(void (*)(void))py_allocate_ranks, METH_VARARGS | METH_KEYWORDS,
     "allocate_ranks(importance, rows, cols, avg_rank, keep_ratio, alpha, eps) -> int64 ranks."},
    /* ---- end lowrank methods ---- */



    /* ---- search methods ---- */
    {"search_prepare", py_search_prepare, METH_VARARGS, "Rank candidates and softmax of router logits."},
    {"search_factor", py_search_factor, METH_VARARGS, "Packed QR factors of candidate expert outputs."},
    {"search_loss", py_search_loss, METH_VARARGS, "Re-routed reconstruction loss of a batch of masks."},
    {"search_importance", py_search_importance, METH_VARARGS, "Loss of dropping each expert alone."},
    {"search_greedy", py_search_greedy, METH_VARARGS, "Greedy expert removal."},
    {"search_exhaustive", py_search_exhaustive, METH_VARARGS, "Every r-subset, K best kept."},
    {"search_genetic", py_search_genetic, METH_VARARGS, "Layer-wise genetic search."},


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
