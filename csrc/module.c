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

/* search_greedy(cache, num_experts, r, num_threads) -> (mask u64[W], step_best, step_mean, evaluations) */
static PyObject *py_search_greedy(PyObject *self, PyObject *args) {
    PyObject *cache_o;
    long long E, r;
    int threads;
    if (!PyArg_ParseTuple(args, "OLLi", &cache_o, &E, &r, &threads)) return NULL;
    moei2_search_cache cache;
    if (parse_cache_experts(cache_o, E, &cache)) return NULL;
    if (r < 0 || r > cache.num_candidates - cache.top_k || r > E - cache.top_k)
        return PyErr_Format(PyExc_ValueError, "r must be in [0, %lld], got %lld",
                            (long long)(cache.num_candidates - cache.top_k), r);
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

/* Shared ending of the subset searches: trims the result arrays to what was found. */
static PyObject *search_result_tuple(PyArrayObject *masks, PyArrayObject *losses, PyArrayObject *hbest,
                                     PyArrayObject *hmean, moei2_search_result *res) {
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
    if (parse_cache_experts(cache_o, E, &cache)) return NULL;
    if (r < 0 || r > cache.num_candidates - cache.top_k || r > E - cache.top_k)
        return PyErr_Format(PyExc_ValueError, "r must be in [0, %lld], got %lld",
                            (long long)(cache.num_candidates - cache.top_k), r);
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
    if (status != MOEI2_OK) {
        Py_XDECREF(masks);
        Py_XDECREF(losses);
        Py_XDECREF(hb);
        Py_XDECREF(hm);
        return raise_status(status, "exhaustive");
    }
    return search_result_tuple(masks, losses, hb, hm, &res);
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
    if (parse_cache_experts(cache_o, E, &cache)) return NULL;
    if (r < 0 || r > cache.num_candidates - cache.top_k || r > E - cache.top_k)
        return PyErr_Format(PyExc_ValueError, "r must be in [0, %lld], got %lld",
                            (long long)(cache.num_candidates - cache.top_k), r);
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
    if (status != MOEI2_OK) {
        Py_XDECREF(masks);
        Py_XDECREF(losses);
        Py_XDECREF(hb);
        Py_XDECREF(hm);
        return raise_status(status, "genetic");
    }
    return search_result_tuple(masks, losses, hb, hm, &res);
}


/* ==== end search ======================================================================= */



static PyMethodDef core_methods[] = {
    {"blas_info", py_blas_info, METH_NOARGS, "Which BLAS/LAPACK is linked: route, config, core, threads."},
    {"set_blas_threads", py_set_blas_threads, METH_O, "Set the BLAS thread count; returns the previous one."},
    /* ---- lowrank methods ---- */


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
