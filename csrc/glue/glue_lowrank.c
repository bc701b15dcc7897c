/* Glue of the low-rank kernels (lowrank.c): decompose, decompose_many, allocate_ranks. */
#include "glue.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The one check of the low-rank kernel's arguments, with the messages users see (moei2.lowrank only
 * converts and passes them on; the kernel's own MOEI2_ERR_ARG checks are its defence). Checks one
 * (W, gram, rank, A, B) set, A and B being None or preallocated outputs, and fills job; the
 * outputs (new references, allocated here when None) go to *a_out and *b_out. The Gram's sanity
 * check runs here too. `where` prefixes argument names ("" or "items[3]: "). Returns -1 with an
 * exception. */
static PyArrayObject *lowrank_output(PyObject *obj, const char *name, int dtype, npy_intp rows, npy_intp cols) {
    if (obj == Py_None) {
        npy_intp dims[2] = {rows, cols};
        return (PyArrayObject *)PyArray_SimpleNew(2, dims, dtype);
    }
    PyArrayObject *arr = glue_check_array(obj, name, -1, 2, 1);
    if (!arr) return NULL;
    if (PyArray_TYPE(arr) != dtype) {
        PyArray_Descr *want = PyArray_DescrFromType(dtype);
        PyErr_Format(PyExc_TypeError, "%s must have the dtype of W (%S), got %S", name, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(arr));
        Py_XDECREF(want);
        return NULL;
    }
    if (glue_check_shape2(arr, name, rows, cols) < 0) return NULL;
    Py_INCREF(arr);
    return arr;
}

static int lowrank_job_from_args(PyObject *weight_obj, PyObject *gram_obj, PyObject *rank_obj, PyObject *a_obj,
                                 PyObject *b_obj, const char *where, moei2_lowrank_job *job, PyArrayObject **a_out,
                                 PyArrayObject **b_out) {
    char name[96];
    memset(job, 0, sizeof(*job));
    *a_out = *b_out = NULL;
#define NAME(arg) (snprintf(name, sizeof(name), "%s%s", where, arg), name)
    PyArrayObject *weight = glue_check_array(weight_obj, NAME("W"), -1, 2, 0);
    if (!weight) return -1;
    npy_intp m = PyArray_DIM(weight, 0), n = PyArray_DIM(weight, 1);
    if (m < 1 || n < 1) {
        PyErr_Format(PyExc_ValueError, "%s must not be empty, got shape (%zd, %zd)", NAME("W"), (Py_ssize_t)m,
                     (Py_ssize_t)n);
        return -1;
    }
    if (m > INT32_MAX || n > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must have at most %d rows and columns, got shape (%zd, %zd)", NAME("W"),
                     INT32_MAX, (Py_ssize_t)m, (Py_ssize_t)n);
        return -1;
    }
    if (rank_obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s is required", NAME("rank"));
        return -1;
    }
    int64_t rank;
    if (glue_int64(rank_obj, NAME("rank"), INT64_MIN, INT64_MAX, &rank) < 0) return -1;
    int64_t kmax = m < n ? m : n;
    if (rank < 1 || rank > kmax) {
        PyErr_Format(PyExc_ValueError, "%s must be in [1, min(m, n)] = [1, %lld] for W of shape (%zd, %zd), got %lld",
                     NAME("rank"), (long long)kmax, (Py_ssize_t)m, (Py_ssize_t)n, (long long)rank);
        return -1;
    }
    int dtype = PyArray_TYPE(weight);
    PyArrayObject *gram = NULL;
    if (gram_obj != Py_None) {
        gram = glue_check_array(gram_obj, NAME("gram"), NPY_FLOAT64, 2, 0);
        if (!gram) return -1;
        if (PyArray_DIM(gram, 0) != n || PyArray_DIM(gram, 1) != n) {
            PyErr_Format(PyExc_ValueError, "%s must have shape (%zd, %zd) to match the %zd columns of W, got (%zd, %zd)",
                         NAME("gram"), (Py_ssize_t)n, (Py_ssize_t)n, (Py_ssize_t)n, (Py_ssize_t)PyArray_DIM(gram, 0),
                         (Py_ssize_t)PyArray_DIM(gram, 1));
            return -1;
        }
    }
    PyArrayObject *a = lowrank_output(a_obj, NAME("out[0] (A)"), dtype, m, (npy_intp)rank);
    if (!a) return -1;
    PyArrayObject *b = lowrank_output(b_obj, NAME("out[1] (B)"), dtype, (npy_intp)rank, n);
    if (!b) {
        Py_DECREF(a);
        return -1;
    }
    *a_out = a;
    *b_out = b;
    if (glue_arrays_overlap(a, b) || glue_arrays_overlap(a, weight) || glue_arrays_overlap(b, weight) ||
        (gram && (glue_arrays_overlap(a, gram) || glue_arrays_overlap(b, gram)))) {
        PyErr_Format(PyExc_ValueError, "%sout arrays A and B must not share memory with each other or with the inputs",
                     where);
        goto fail;
    }
    if (glue_check_finite(weight, NAME("W")) < 0) goto fail;
    if (gram) {
        if (glue_check_finite(gram, NAME("gram")) < 0) goto fail;
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
            goto fail;
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
fail:
    Py_CLEAR(*a_out);
    Py_CLEAR(*b_out);
    return -1;
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
            glue_raise_status(job->status, "decompose");
        return -1;
    }
    if (job->info.indefinite) {
        char lo[32], hi[32];
        PyErr_Format(PyExc_ValueError, "%sgram is not positive semidefinite: W G W^T has eigenvalue %s against a "
                     "largest of %s", where, glue_fmt(lo, sizeof lo, job->info.min_eigenvalue),
                     glue_fmt(hi, sizeof hi, job->info.max_eigenvalue));
        return -1;
    }
    return 0;
}

/* (A, B, info) of a finished job; steals the references to A and B. */
static PyObject *lowrank_result(const moei2_lowrank_job *job, PyArrayObject *a, PyArrayObject *b) {
    PyObject *info = lowrank_info_dict(job);
    if (!info) {
        Py_DECREF(a);
        Py_DECREF(b);
        return NULL;
    }
    return Py_BuildValue("(NNN)", (PyObject *)a, (PyObject *)b, info);
}

static PyObject *py_lowrank_decompose(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"W", "gram", "rank", "A", "B", "skip_solvers", NULL};
    PyObject *weight, *gram, *rank, *a_obj = Py_None, *b_obj = Py_None;
    unsigned int skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OOI", kwlist, &weight, &gram, &rank, &a_obj, &b_obj, &skip))
        return NULL;
    moei2_lowrank_job job;
    PyArrayObject *a, *b;
    if (lowrank_job_from_args(weight, gram, rank, a_obj, b_obj, "", &job, &a, &b) < 0) return NULL;
    job.skip_solvers = skip;
    Py_BEGIN_ALLOW_THREADS
    moei2_lowrank_decompose(&job);
    Py_END_ALLOW_THREADS
    if (lowrank_job_raise(&job, "") < 0) {
        Py_DECREF(a);
        Py_DECREF(b);
        return NULL;
    }
    return lowrank_result(&job, a, b);
}

static PyObject *py_lowrank_decompose_many(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"items", "num_threads", "skip_solvers", NULL};
    PyObject *items_obj, *threads_obj;
    int num_threads;
    unsigned int skip = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|I", kwlist, &items_obj, &threads_obj, &skip)) return NULL;
    if (glue_threads(threads_obj, &num_threads) < 0) return NULL;
    /* A tuple copy, so that nothing the workers read can be freed or replaced while the GIL is
     * released: the copy holds a reference to every item, and each item tuple to its arrays. */
    /* Only a list or tuple: any other sequence (an ndarray with 2^31 rows) could take unbounded
     * time and memory to copy before a single item is checked. */
    if (!PyList_Check(items_obj) && !PyTuple_Check(items_obj))
        return PyErr_Format(PyExc_TypeError, "items must be a list or tuple of (W, gram, rank) tuples, got %s",
                            Py_TYPE(items_obj)->tp_name);
    PyObject *items = PySequence_Tuple(items_obj);
    if (!items) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(items);
    /* The outputs are allocated here, one pair per item, so no item writes into another's memory. */
    moei2_lowrank_job *jobs = (moei2_lowrank_job *)PyMem_Calloc(count > 0 ? (size_t)count : 1, sizeof(*jobs));
    PyArrayObject **outputs = (PyArrayObject **)PyMem_Calloc(count > 0 ? 2 * (size_t)count : 1, sizeof(*outputs));
    PyObject *result = NULL;
    if (!jobs || !outputs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        char where[48];
        snprintf(where, sizeof(where), "items[%zd]: ", i);
        PyObject *item = PyTuple_GET_ITEM(items, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_Format(PyExc_TypeError, "items[%zd] must be a (W, gram, rank) tuple", i);
            goto done;
        }
        if (lowrank_job_from_args(PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1), PyTuple_GET_ITEM(item, 2),
                                  Py_None, Py_None, where, &jobs[i], &outputs[2 * i], &outputs[2 * i + 1]) < 0)
            goto done;
        jobs[i].skip_solvers = skip;
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
        PyObject *one = lowrank_result(&jobs[i], outputs[2 * i], outputs[2 * i + 1]);
        outputs[2 * i] = outputs[2 * i + 1] = NULL;
        if (!one) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, one);
    }
done:
    if (outputs)
        for (Py_ssize_t i = 0; i < 2 * count; i++) Py_XDECREF(outputs[i]);
    PyMem_Free(outputs);
    PyMem_Free(jobs);
    Py_DECREF(items);
    return result;
}

static PyObject *py_allocate_ranks(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"importance", "rows", "cols", "avg_rank", "keep_ratio", "alpha", "eps", NULL};
    PyObject *imp_obj, *rows_obj, *cols_obj, *avg_obj, *keep_obj;
    double alpha, eps;
    char fmt[32];
#define FMT(x) glue_fmt(fmt, sizeof fmt, (x))
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOdd", kwlist, &imp_obj, &rows_obj, &cols_obj, &avg_obj,
                                     &keep_obj, &alpha, &eps))
        return NULL;
    PyArrayObject *imp = glue_check_array(imp_obj, "importance", NPY_FLOAT64, 1, 0);
    if (!imp) return NULL;
    PyArrayObject *rows = glue_check_array(rows_obj, "shapes rows", NPY_INT64, 1, 0);
    if (!rows) return NULL;
    PyArrayObject *cols = glue_check_array(cols_obj, "shapes cols", NPY_INT64, 1, 0);
    if (!cols) return NULL;
    npy_intp count = PyArray_DIM(imp, 0);
    if (count < 1) return PyErr_Format(PyExc_ValueError, "importance must not be empty");
    if (PyArray_DIM(rows, 0) != count || PyArray_DIM(cols, 0) != count)
        return PyErr_Format(PyExc_ValueError, "shapes must have one (m, n) per expert: %zd importances, %zd shapes",
                            (Py_ssize_t)count, (Py_ssize_t)PyArray_DIM(rows, 0));
    if (glue_check_finite(imp, "importance") < 0) return NULL;
    const double *iv = (const double *)PyArray_DATA(imp);
    const int64_t *rv = (const int64_t *)PyArray_DATA(rows), *cv = (const int64_t *)PyArray_DATA(cols);
    for (npy_intp j = 0; j < count; j++) {
        if (iv[j] < 0.0)
            return PyErr_Format(PyExc_ValueError, "importance must be >= 0, got %s at %zd", FMT(iv[j]), (Py_ssize_t)j);
        if (rv[j] < 1 || cv[j] < 1 || rv[j] > INT32_MAX || cv[j] > INT32_MAX)
            return PyErr_Format(PyExc_ValueError, "shapes must be positive and below 2^31, got (%lld, %lld) at %zd",
                                (long long)rv[j], (long long)cv[j], (Py_ssize_t)j);
    }
    if (!(isfinite(alpha) && alpha >= 0.0))
        return PyErr_Format(PyExc_ValueError, "alpha must be finite and >= 0, got %s", FMT(alpha));
    if (!(isfinite(eps) && eps >= 0.0))
        return PyErr_Format(PyExc_ValueError, "eps must be finite and >= 0, got %s", FMT(eps));
    double avg = -1.0, keep = -1.0;
    if ((avg_obj == Py_None) == (keep_obj == Py_None))
        return PyErr_Format(PyExc_ValueError, "give exactly one of avg_rank and keep_ratio");
    if (avg_obj != Py_None) {
        avg = PyFloat_AsDouble(avg_obj);
        if (avg == -1.0 && PyErr_Occurred()) return NULL;
        if (!(isfinite(avg) && avg > 0.0))
            return PyErr_Format(PyExc_ValueError, "avg_rank must be finite and > 0, got %s", FMT(avg));
    } else {
        keep = PyFloat_AsDouble(keep_obj);
        if (keep == -1.0 && PyErr_Occurred()) return NULL;
        if (!(isfinite(keep) && keep > 0.0 && keep <= 1.0))
            return PyErr_Format(PyExc_ValueError, "keep_ratio must be in (0, 1], got %s", FMT(keep));
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
        return glue_raise_status(status, "allocate_ranks");
    }
    return (PyObject *)ranks;
#undef FMT
}

PyMethodDef glue_lowrank_methods[] = {
    {"lowrank_decompose", (PyCFunction)(void (*)(void))py_lowrank_decompose, METH_VARARGS | METH_KEYWORDS,
     "lowrank_decompose(W, gram, rank, A=None, B=None, skip_solvers=0) -> (A, B, info); A, B allocated when None."},
    {"lowrank_decompose_many", (PyCFunction)(void (*)(void))py_lowrank_decompose_many, METH_VARARGS | METH_KEYWORDS,
     "lowrank_decompose_many(items, num_threads, skip_solvers=0) -> [(A, B, info)]: items of (W, gram, rank)."},
    {"allocate_ranks", (PyCFunction)(void (*)(void))py_allocate_ranks, METH_VARARGS | METH_KEYWORDS,
     "allocate_ranks(importance, rows, cols, avg_rank, keep_ratio, alpha, eps) -> int64 ranks."},
    {NULL, NULL, 0, NULL},
};
