/* Glue of the search kernels: the SearchCache type, which owns a layer's search cache in C
 * memory (nothing crosses the boundary per call but the cache object itself), builds it from
 * router logits and candidate outputs, and runs the searches on it; plus candidate_outputs, the
 * SiLU-expert kernel on its own. */
#include "glue.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_internal.h"

typedef struct {
    PyObject_HEAD
    moei2_search_cache cache; /* points into the arrays below, all owned by this object */
    int64_t *batch_ends;      /* [B] */
    int32_t *candidates;      /* [N, C] */
    double *candidate_probs;  /* [N, C] */
    double *probs;            /* [N, E] or NULL when renormalising */
    uint64_t *topk_bits;      /* [N, W] */
    double *factor;           /* [N, P] */
    double *norm2;            /* [N] */
    double *bias;             /* [E] the rule's choice bias, or NULL */
    int64_t r_max;
    int64_t factored;         /* tokens [0, factored) have their factor */
    int64_t dim;              /* width of the candidate outputs, 0 before the first chunk */
    int64_t qr_tokens;        /* tokens factored by QR rather than by Cholesky of the Gram */
    int64_t bytes;            /* memory held by the arrays */
    int writing;              /* a factor call runs with the GIL released */
} CacheObject;

static void cache_free_arrays(CacheObject *self) {
    free(self->batch_ends); free(self->candidates); free(self->candidate_probs); free(self->probs);
    free(self->topk_bits); free(self->factor); free(self->norm2); free(self->bias);
    self->bias = NULL;
    self->batch_ends = NULL; self->candidates = NULL; self->candidate_probs = NULL; self->probs = NULL;
    self->topk_bits = NULL; self->factor = NULL; self->norm2 = NULL;
}

static void cache_dealloc(CacheObject *self) {
    cache_free_arrays(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* n x m elements of size bytes, added to *bytes; NULL (MemoryError set) on overflow or failure. */
static void *alloc2(int64_t n, int64_t m, size_t size, int64_t *bytes) {
    int64_t count;
    void *p = moei2_mul_ok(n, m, &count) ? NULL : moei2_alloc(count, size);
    if (!p) {
        PyErr_Format(PyExc_MemoryError, "SearchCache: cannot allocate %lld x %lld elements", (long long)n,
                     (long long)m);
        return NULL;
    }
    *bytes += count * (int64_t)size;
    return p;
}

static PyObject *cache_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"router_logits", "top_k", "r_max", "renormalize", "scaling_factor", "batch_ends",
                             "weights", "choice_bias", "norm_eps", "num_groups", "top_groups", "window", NULL};
    PyObject *logits_o, *k_o, *r_o, *renorm_o, *scale_o, *ends_o, *bias_o = Py_None, *eps_o = NULL, *groups_o = NULL,
             *top_groups_o = NULL, *window_o = NULL;
    const char *weights_s = "softmax";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OOOOOsOOOOO", kwlist, &logits_o, &k_o, &r_o, &renorm_o, &scale_o,
                                     &ends_o, &weights_s, &bias_o, &eps_o, &groups_o, &top_groups_o, &window_o))
        return NULL;
    if (!k_o || !r_o || !renorm_o || !scale_o || !ends_o)
        return PyErr_Format(PyExc_TypeError, "SearchCache needs top_k, r_max, renormalize, scaling_factor and batch_ends");
    PyArrayObject *logits = glue_check_array(logits_o, "router_logits", NPY_FLOAT64, 2, 0);
    if (!logits) return NULL;
    const npy_intp N = PyArray_DIM(logits, 0), E = PyArray_DIM(logits, 1);
    if (N < 1 || E < 2 || E > INT32_MAX)
        return PyErr_Format(PyExc_ValueError, "router_logits must be [tokens >= 1, 2 <= experts < 2^31], got (%zd, %zd)",
                            (Py_ssize_t)N, (Py_ssize_t)E);
    if (glue_check_finite(logits, "router_logits") < 0) return NULL;
    int64_t k, r_max;
    if (glue_int64(k_o, "top_k", 1, E - 1, &k) < 0 || glue_int64(r_o, "r_max", 1, E - k, &r_max) < 0) return NULL;
    if (!PyBool_Check(renorm_o))
        return PyErr_Format(PyExc_TypeError, "renormalize must be a bool, got %s", Py_TYPE(renorm_o)->tp_name);
    const int renorm = renorm_o == Py_True;
    double scaling;
    if (glue_double(scale_o, "scaling_factor", &scaling) < 0) return NULL;
    if (!(scaling > 0.0)) {
        char buf[32];
        return PyErr_Format(PyExc_ValueError, "scaling_factor must be positive, got %s", glue_fmt(buf, sizeof buf, scaling));
    }
    moei2_routing_rule rule = {MOEI2_WEIGHTS_SOFTMAX, k, renorm, 0.0, scaling, NULL, 1, 1, 0.0};
    if (!strcmp(weights_s, "sigmoid")) rule.weights = MOEI2_WEIGHTS_SIGMOID;
    else if (!strcmp(weights_s, "unit")) rule.weights = MOEI2_WEIGHTS_UNIT;
    else if (!strcmp(weights_s, "sparsemixer")) rule.weights = MOEI2_WEIGHTS_SPARSEMIXER;
    else if (strcmp(weights_s, "softmax"))
        return PyErr_Format(PyExc_ValueError, "weights must be 'softmax', 'sigmoid', 'unit' or 'sparsemixer', got '%s'",
                            weights_s);
    if (window_o && glue_double(window_o, "window", &rule.window) < 0) return NULL;
    if (eps_o && glue_double(eps_o, "norm_eps", &rule.norm_eps) < 0) return NULL;
    if (!(rule.norm_eps >= 0.0)) return PyErr_Format(PyExc_ValueError, "norm_eps must be >= 0");
    if (groups_o && glue_int64(groups_o, "num_groups", 1, E, &rule.num_groups) < 0) return NULL;
    if (top_groups_o && glue_int64(top_groups_o, "top_groups", 1, rule.num_groups, &rule.top_groups) < 0) return NULL;
    PyArrayObject *bias = NULL;
    if (bias_o != Py_None) {
        if (!(bias = glue_check_array(bias_o, "choice_bias", NPY_FLOAT64, 1, 0))) return NULL;
        if (PyArray_DIM(bias, 0) != E)
            return PyErr_Format(PyExc_ValueError, "choice_bias must have one entry per expert (%zd), got %zd",
                                (Py_ssize_t)E, (Py_ssize_t)PyArray_DIM(bias, 0));
        if (glue_check_finite(bias, "choice_bias") < 0) return NULL;
        rule.choice_bias = PyArray_DATA(bias);
    }
    const int reranks = moei2_rule_reranks(&rule, E);
    if (reranks < 0)
        return PyErr_Format(PyExc_ValueError, "routing rule: num_groups must divide the %zd experts, groups need "
                            "sigmoid weights, unit weights take no choice_bias, and sparsemixer weights (the only ones with a window "
                            ">= 0) take no bias, groups or renormalisation", (Py_ssize_t)E);
    PyArrayObject *ends = glue_check_array(ends_o, "batch_ends", NPY_INT64, 1, 0);
    if (!ends) return NULL;
    const npy_intp B = PyArray_DIM(ends, 0);
    const int64_t *e = (const int64_t *)PyArray_DATA(ends);
    if (B < 1 || e[B - 1] != (int64_t)N)
        return PyErr_Format(PyExc_ValueError, "batch_ends must be non-empty and end at the %zd tokens", (Py_ssize_t)N);
    for (npy_intp b = 0; b < B; b++)
        if (e[b] <= (b ? e[b - 1] : 0))
            return PyErr_Format(PyExc_ValueError, "batch_ends must be positive and strictly increasing");

    /* A reranking rule can re-route a token to any expert: every expert is a candidate. */
    const int64_t C = reranks ? E : k + r_max, W = MOEI2_MASK_WORDS((int64_t)E), P = MOEI2_PACKED_SIZE(C);
    CacheObject *self = (CacheObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    int64_t bytes = 0;
    if (!(self->batch_ends = alloc2(B, 1, sizeof(int64_t), &bytes)) ||
        !(self->candidates = alloc2(N, C, sizeof(int32_t), &bytes)) ||
        !(self->candidate_probs = alloc2(N, C, sizeof(double), &bytes)) ||
        (!renorm && rule.weights == MOEI2_WEIGHTS_SOFTMAX && !(self->probs = alloc2(N, E, sizeof(double), &bytes))) ||
        (rule.choice_bias && !(self->bias = alloc2(E, 1, sizeof(double), &bytes))) ||
        !(self->topk_bits = alloc2(N, W, sizeof(uint64_t), &bytes)) ||
        !(self->factor = alloc2(N, P, sizeof(double), &bytes)) || !(self->norm2 = alloc2(N, 1, sizeof(double), &bytes))) {
        Py_DECREF(self);
        return NULL;
    }
    memcpy(self->batch_ends, e, (size_t)B * sizeof(int64_t));
    if (rule.choice_bias) {
        memcpy(self->bias, rule.choice_bias, (size_t)E * sizeof(double));
        rule.choice_bias = self->bias;
    }
    self->bytes = bytes;
    self->r_max = r_max;
    moei2_search_cache *c = &self->cache;
    c->num_tokens = N;
    c->num_experts = E;
    c->top_k = k;
    c->num_candidates = C;
    c->renormalize = renorm;
    c->scaling = scaling;
    c->num_batches = B;
    c->batch_ends = self->batch_ends;
    c->candidates = self->candidates;
    c->candidate_probs = self->candidate_probs;
    c->probs = self->probs;
    c->topk_bits = self->topk_bits;
    c->factor = self->factor;
    c->output_norm2 = self->norm2;
    c->weights = rule.weights;
    c->norm_eps = rule.norm_eps;
    c->choice_bias = self->bias;
    c->num_groups = rule.num_groups;
    c->top_groups = rule.top_groups;
    c->window = rule.window;
    moei2_status status;
    const double *z = (const double *)PyArray_DATA(logits);
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_prepare_rule(N, E, &rule, C, z, self->candidates, self->candidate_probs, self->probs,
                                       self->topk_bits);
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        if (status == MOEI2_ERR_NONFINITE)
            PyErr_SetString(PyExc_ValueError, "router_logits: a candidate expert has routing weight 0 "
                                              "(logits spread too wide for float64)");
        else
            glue_raise_status(status, "SearchCache");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* ---- building: candidates out, factors in -------------------------------------------------- */

static PyObject *cache_candidates(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"first", "count", NULL};
    PyObject *first_o, *count_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", kwlist, &first_o, &count_o)) return NULL;
    const int64_t N = self->cache.num_tokens, C = self->cache.num_candidates;
    int64_t first, count;
    if (glue_int64(first_o, "first", 0, N, &first) < 0 || glue_int64(count_o, "count", 0, N - first, &count) < 0)
        return NULL;
    npy_intp dims[2] = {(npy_intp)count, (npy_intp)C};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT64);
    if (!out) return NULL;
    int64_t *dst = (int64_t *)PyArray_DATA(out);
    const int32_t *src = self->candidates + first * C;
    for (int64_t i = 0; i < count * C; i++) dst[i] = src[i];
    return (PyObject *)out;
}

/* Shared checks of the factor methods: not already being written, chunks in token order. */
static int cache_begin_chunk(CacheObject *self, PyObject *first_o, int64_t *first) {
    if (self->writing) {
        PyErr_SetString(PyExc_RuntimeError, "SearchCache: another thread is adding a chunk to this cache");
        return -1;
    }
    const int64_t N = self->cache.num_tokens;
    if (glue_int64(first_o, "first", 0, N, first) < 0) return -1;
    if (*first != self->factored) {
        PyErr_Format(PyExc_ValueError, "first must be %lld: chunks are added in token order (%lld of %lld tokens done)",
                     (long long)self->factored, (long long)self->factored, (long long)N);
        return -1;
    }
    if (*first == N) {
        PyErr_SetString(PyExc_ValueError, "SearchCache: every token is already factored");
        return -1;
    }
    return 0;
}

static int cache_check_dim(CacheObject *self, int64_t d, const char *name) {
    const int64_t C = self->cache.num_candidates;
    if (d < 1 || d > INT32_MAX / C) {
        PyErr_Format(PyExc_ValueError, "%s: the output width must be in [1, %lld], got %lld", name,
                     (long long)(INT32_MAX / C), (long long)d);
        return -1;
    }
    if (self->dim && d != self->dim) {
        PyErr_Format(PyExc_ValueError, "%s: output width %lld differs from the %lld of earlier chunks", name,
                     (long long)d, (long long)self->dim);
        return -1;
    }
    return 0;
}

/* Factors outputs [n, C, d] of tokens [first, first + n) with the GIL released. */
static int cache_factor_run(CacheObject *self, int64_t first, int64_t n, int64_t d, const float *f32,
                            const double *f64, int threads, const char *what) {
    const int64_t C = self->cache.num_candidates, P = MOEI2_PACKED_SIZE(C);
    int64_t qr = 0;
    moei2_status status;
    self->writing = 1;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_factor(n, C, d, f32, f64, self->cache.top_k, self->cache.renormalize, self->cache.scaling,
                                 self->candidate_probs + first * C, self->factor + first * P, self->norm2 + first,
                                 threads, &qr);
    Py_END_ALLOW_THREADS
    self->writing = 0;
    if (status != MOEI2_OK) {
        if (status == MOEI2_ERR_NONFINITE)
            PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf", what);
        else
            glue_raise_status(status, "SearchCache.factor");
        return -1;
    }
    self->factored += n;
    self->dim = d;
    self->qr_tokens += qr;
    return 0;
}

static PyObject *cache_factor_outputs(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"outputs", "first", "num_threads", NULL};
    PyObject *out_o, *first_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO", kwlist, &out_o, &first_o, &threads_o)) return NULL;
    int64_t first;
    int threads;
    if (cache_begin_chunk(self, first_o, &first) < 0 || glue_threads(threads_o, &threads) < 0) return NULL;
    PyArrayObject *outputs = glue_check_array(out_o, "candidate outputs", -1, 3, 0);
    if (!outputs) return NULL;
    const int64_t n = PyArray_DIM(outputs, 0), C = self->cache.num_candidates, d = PyArray_DIM(outputs, 2);
    if (n < 1 || n > self->cache.num_tokens - first || PyArray_DIM(outputs, 1) != C)
        return PyErr_Format(PyExc_ValueError, "candidate outputs must have shape (n, %lld, d) with 1 <= n <= %lld, "
                            "got (%zd, %zd, %zd)", (long long)C, (long long)(self->cache.num_tokens - first),
                            (Py_ssize_t)n, (Py_ssize_t)PyArray_DIM(outputs, 1), (Py_ssize_t)d);
    if (cache_check_dim(self, d, "candidate outputs") < 0) return NULL;
    const int f32 = PyArray_TYPE(outputs) == NPY_FLOAT32;
    /* The array stays alive: the caller's argument holds it for the duration of the call. */
    if (cache_factor_run(self, first, n, d, f32 ? PyArray_DATA(outputs) : NULL, f32 ? NULL : PyArray_DATA(outputs),
                         threads, "candidate outputs") < 0)
        return NULL;
    return PyLong_FromLongLong(n);
}

/* Checks x [*, H], gate_up [E, 2F, H], down [E, H, F], all float32; fills the shape fields. */
static int experts_check(PyObject *x_o, PyObject *gu_o, PyObject *dn_o, int64_t E, PyArrayObject **x,
                         PyArrayObject **gu, PyArrayObject **dn, int64_t *H, int64_t *F) {
    if (!(*x = glue_check_array(x_o, "X", NPY_FLOAT32, 2, 0))) return -1;
    if (!(*gu = glue_check_array(gu_o, "gate_up_proj", NPY_FLOAT32, 3, 0))) return -1;
    if (!(*dn = glue_check_array(dn_o, "down_proj", NPY_FLOAT32, 3, 0))) return -1;
    *H = PyArray_DIM(*x, 1);
    *F = PyArray_DIM(*gu, 1) / 2;
    if (*H < 1 || *H > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "X must have between 1 and 2^31 - 1 columns, got %lld", (long long)*H);
        return -1;
    }
    if (PyArray_DIM(*gu, 0) != E || PyArray_DIM(*gu, 2) != *H || PyArray_DIM(*gu, 1) % 2 || *F < 1 ||
        *F > INT32_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "gate_up_proj must have shape (%lld, 2I, %lld) with I >= 1, got (%zd, %zd, %zd)",
                     (long long)E, (long long)*H, (Py_ssize_t)PyArray_DIM(*gu, 0), (Py_ssize_t)PyArray_DIM(*gu, 1),
                     (Py_ssize_t)PyArray_DIM(*gu, 2));
        return -1;
    }
    if (PyArray_DIM(*dn, 0) != E || PyArray_DIM(*dn, 1) != *H || PyArray_DIM(*dn, 2) != *F) {
        PyErr_Format(PyExc_ValueError, "down_proj must have shape (%lld, %lld, %lld), got (%zd, %zd, %zd)", (long long)E,
                     (long long)*H, (long long)*F, (Py_ssize_t)PyArray_DIM(*dn, 0), (Py_ssize_t)PyArray_DIM(*dn, 1),
                     (Py_ssize_t)PyArray_DIM(*dn, 2));
        return -1;
    }
    return 0;
}

static PyObject *cache_factor_moe(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"X", "gate_up_proj", "down_proj", "first", "count", "num_threads", NULL};
    PyObject *x_o, *gu_o, *dn_o, *first_o, *count_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO", kwlist, &x_o, &gu_o, &dn_o, &first_o, &count_o,
                                     &threads_o))
        return NULL;
    int64_t first, count, H, F;
    int threads;
    if (cache_begin_chunk(self, first_o, &first) < 0 || glue_threads(threads_o, &threads) < 0) return NULL;
    const int64_t N = self->cache.num_tokens, C = self->cache.num_candidates, E = self->cache.num_experts;
    if (glue_int64(count_o, "count", 1, N - first, &count) < 0) return NULL;
    PyArrayObject *x, *gu, *dn;
    if (experts_check(x_o, gu_o, dn_o, E, &x, &gu, &dn, &H, &F) < 0) return NULL;
    if (PyArray_DIM(x, 0) != N)
        return PyErr_Format(PyExc_ValueError, "X must have the cache's %lld rows, got %zd", (long long)N,
                            (Py_ssize_t)PyArray_DIM(x, 0));
    if (cache_check_dim(self, H, "X") < 0) return NULL;
    float *outputs = NULL;
    int64_t cells;
    if (!moei2_mul_ok(count, C, &cells) && !moei2_mul_ok(cells, H, &cells)) outputs = moei2_alloc(cells, sizeof(float));
    if (!outputs) return PyErr_Format(PyExc_MemoryError, "SearchCache.factor_moe: no room for %lld tokens' candidate "
                                      "outputs; use a smaller count", (long long)count);
    moei2_expert_outputs_job job = {count, C, E, H, F, (const float *)PyArray_DATA(x) + first * H,
                                    self->candidates + first * C, PyArray_DATA(gu), PyArray_DATA(dn), outputs};
    moei2_status status;
    self->writing = 1;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_candidate_outputs(&job, threads);
    Py_END_ALLOW_THREADS
    self->writing = 0;
    int failed = status != MOEI2_OK;
    if (failed) glue_raise_status(status, "candidate_outputs");
    else failed = cache_factor_run(self, first, count, H, outputs, NULL, threads,
                                   "the candidate outputs (from X and the expert weights)") < 0;
    free(outputs);
    if (failed) return NULL;
    return PyLong_FromLongLong(count);
}

/* ---- searches --------------------------------------------------------------------------- */

static int cache_ready(CacheObject *self) {
    if (self->writing) {
        PyErr_SetString(PyExc_RuntimeError, "SearchCache: a chunk is being added by another thread");
        return -1;
    }
    if (self->factored != self->cache.num_tokens) {
        PyErr_Format(PyExc_ValueError, "SearchCache is incomplete: %lld of %lld tokens factored",
                     (long long)self->factored, (long long)self->cache.num_tokens);
        return -1;
    }
    return 0;
}

/* r experts dropped: at most what re-routing can reach and leaving at least top_k experts. */
static int cache_drop_count(CacheObject *self, PyObject *r_o, int64_t *r) {
    const moei2_search_cache *c = &self->cache;
    int64_t r_max = c->num_candidates - c->top_k;
    if (c->num_experts - c->top_k < r_max) r_max = c->num_experts - c->top_k;
    return glue_int64(r_o, "r", 0, r_max, r);
}

static PyObject *cache_loss(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"masks", "num_threads", NULL};
    PyObject *masks_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", kwlist, &masks_o, &threads_o)) return NULL;
    int threads;
    if (cache_ready(self) < 0 || glue_threads(threads_o, &threads) < 0) return NULL;
    const int64_t E = self->cache.num_experts;
    PyArrayObject *masks = glue_check_array(masks_o, "masks", NPY_UINT64, 2, 0);
    if (!masks || glue_check_shape2(masks, "masks", PyArray_DIM(masks, 0), MOEI2_MASK_WORDS(E))) return NULL;
    npy_intp M = PyArray_DIM(masks, 0);
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(1, &M, NPY_FLOAT64, 0);
    if (!losses) return NULL;
    moei2_status status;
    const uint64_t *mb = PyArray_DATA(masks);
    double *out = PyArray_DATA(losses);
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_loss(&self->cache, mb, M, threads, out);
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        Py_DECREF(losses);
        if (status == MOEI2_ERR_ARG)
            return PyErr_Format(PyExc_ValueError, "masks: each mask may drop at most %lld experts (r_max) and no "
                                "expert index >= %lld", (long long)(self->cache.num_candidates - self->cache.top_k),
                                (long long)E);
        return glue_raise_status(status, "SearchCache.loss");
    }
    return (PyObject *)losses;
}

static PyObject *cache_importance(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"num_threads", NULL};
    PyObject *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O", kwlist, &threads_o)) return NULL;
    int threads;
    if (cache_ready(self) < 0 || glue_threads(threads_o, &threads) < 0) return NULL;
    npy_intp n = self->cache.num_experts;
    PyArrayObject *imp = (PyArrayObject *)PyArray_ZEROS(1, &n, NPY_FLOAT64, 0);
    if (!imp) return NULL;
    moei2_status status;
    double *out = PyArray_DATA(imp);
    Py_BEGIN_ALLOW_THREADS
    status = moei2_search_expert_importance(&self->cache, threads, out);
    Py_END_ALLOW_THREADS
    if (status != MOEI2_OK) {
        Py_DECREF(imp);
        return glue_raise_status(status, "SearchCache.importance");
    }
    return (PyObject *)imp;
}

static PyObject *cache_greedy(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"r", "num_threads", NULL};
    PyObject *r_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", kwlist, &r_o, &threads_o)) return NULL;
    int64_t r;
    int threads;
    if (cache_ready(self) < 0 || cache_drop_count(self, r_o, &r) < 0 || glue_threads(threads_o, &threads) < 0)
        return NULL;
    npy_intp W = MOEI2_MASK_WORDS(self->cache.num_experts), rn = r;
    PyArrayObject *mask = (PyArrayObject *)PyArray_ZEROS(1, &W, NPY_UINT64, 0);
    PyArrayObject *best = (PyArrayObject *)PyArray_ZEROS(1, &rn, NPY_FLOAT64, 0);
    PyArrayObject *mean = (PyArrayObject *)PyArray_ZEROS(1, &rn, NPY_FLOAT64, 0);
    int64_t evaluations = 0;
    moei2_status status = MOEI2_ERR_NOMEM;
    if (mask && best && mean) {
        uint64_t *m = PyArray_DATA(mask);
        double *b = PyArray_DATA(best), *a = PyArray_DATA(mean);
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_greedy(&self->cache, r, threads, m, b, a, &evaluations);
        Py_END_ALLOW_THREADS
    }
    if (status != MOEI2_OK) {
        Py_XDECREF(mask);
        Py_XDECREF(best);
        Py_XDECREF(mean);
        return glue_raise_status(status, "SearchCache.greedy");
    }
    return Py_BuildValue("{s:N,s:N,s:N,s:L}", "mask", mask, "history_best", best, "history_mean", mean,
                         "evaluations", (long long)evaluations);
}

/* The result arrays of a subset search, trimmed to what it found. */
typedef struct {
    PyArrayObject *masks, *losses, *hbest, *hmean;
    moei2_search_result res;
} result_arrays;

static int result_alloc(result_arrays *out, int64_t k_best, int64_t words, int64_t generations) {
    memset(out, 0, sizeof *out);
    npy_intp dm[2] = {(npy_intp)k_best, (npy_intp)words}, dk = (npy_intp)k_best, dg = (npy_intp)generations;
    out->masks = (PyArrayObject *)PyArray_ZEROS(2, dm, NPY_UINT64, 0);
    out->losses = (PyArrayObject *)PyArray_ZEROS(1, &dk, NPY_FLOAT64, 0);
    out->hbest = (PyArrayObject *)PyArray_ZEROS(1, &dg, NPY_FLOAT64, 0);
    out->hmean = (PyArrayObject *)PyArray_ZEROS(1, &dg, NPY_FLOAT64, 0);
    if (!out->masks || !out->losses || !out->hbest || !out->hmean) return -1;
    out->res.masks = PyArray_DATA(out->masks);
    out->res.losses = PyArray_DATA(out->losses);
    out->res.history_best = PyArray_DATA(out->hbest);
    out->res.history_mean = PyArray_DATA(out->hmean);
    return 0;
}

static PyObject *result_finish(result_arrays *out, moei2_status status, const char *what) {
    PyObject *value = NULL;
    if (status != MOEI2_OK) {
        if (!PyErr_Occurred()) glue_raise_status(status, what);
    } else {
        PyObject *m = PySequence_GetSlice((PyObject *)out->masks, 0, out->res.found);
        PyObject *l = PySequence_GetSlice((PyObject *)out->losses, 0, out->res.found);
        PyObject *hb = PySequence_GetSlice((PyObject *)out->hbest, 0, out->res.history_length);
        PyObject *hm = PySequence_GetSlice((PyObject *)out->hmean, 0, out->res.history_length);
        if (m && l && hb && hm)
            value = Py_BuildValue("{s:O,s:O,s:O,s:O,s:L}", "masks", m, "losses", l, "history_best", hb,
                                  "history_mean", hm, "evaluations", (long long)out->res.evaluations);
        Py_XDECREF(m);
        Py_XDECREF(l);
        Py_XDECREF(hb);
        Py_XDECREF(hm);
    }
    Py_XDECREF(out->masks);
    Py_XDECREF(out->losses);
    Py_XDECREF(out->hbest);
    Py_XDECREF(out->hmean);
    return value;
}

/* The most masks, generations and population members a search call accepts: far beyond any
 * useful search, and small enough that no size computed from them can overflow. */
#define SEARCH_LIMIT ((int64_t)1 << 40)

static PyObject *cache_exhaustive(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"r", "k_best", "num_threads", NULL};
    PyObject *r_o, *k_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO", kwlist, &r_o, &k_o, &threads_o)) return NULL;
    int64_t r, k_best;
    int threads;
    if (cache_ready(self) < 0 || cache_drop_count(self, r_o, &r) < 0 ||
        glue_int64(k_o, "k_best", 1, SEARCH_LIMIT, &k_best) < 0 || glue_threads(threads_o, &threads) < 0)
        return NULL;
    const uint64_t total = moei2_combinations(self->cache.num_experts, r);
    if ((uint64_t)k_best > total) k_best = (int64_t)total;
    result_arrays out;
    moei2_status status = MOEI2_ERR_NOMEM;
    if (result_alloc(&out, k_best, MOEI2_MASK_WORDS(self->cache.num_experts), 0) == 0) {
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_exhaustive(&self->cache, r, k_best, threads, &out.res);
        Py_END_ALLOW_THREADS
    }
    return result_finish(&out, status, "SearchCache.exhaustive");
}

static PyObject *cache_genetic(CacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"r", "k_best", "population", "generations", "elite_count", "mutation_rate", "seed",
                             "num_threads", NULL};
    PyObject *r_o, *k_o, *pop_o, *gen_o, *elite_o, *rate_o, *seed_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOOOO", kwlist, &r_o, &k_o, &pop_o, &gen_o, &elite_o, &rate_o,
                                     &seed_o, &threads_o))
        return NULL;
    int64_t r, k_best, population, generations, elite;
    double rate;
    int threads;
    if (cache_ready(self) < 0 || cache_drop_count(self, r_o, &r) < 0 ||
        glue_int64(k_o, "k_best", 1, SEARCH_LIMIT, &k_best) < 0 ||
        glue_int64(pop_o, "population", 2, SEARCH_LIMIT, &population) < 0 ||
        glue_int64(gen_o, "generations", 1, SEARCH_LIMIT, &generations) < 0 ||
        glue_int64(elite_o, "elite_count", 1, population, &elite) < 0 || glue_double(rate_o, "mutation_rate", &rate) < 0 ||
        glue_threads(threads_o, &threads) < 0)
        return NULL;
    if (!(rate >= 0.0 && rate <= 1.0)) {
        char buf[32];
        return PyErr_Format(PyExc_ValueError, "mutation_rate must be in [0, 1], got %s", glue_fmt(buf, sizeof buf, rate));
    }
    if (PyBool_Check(seed_o) || !PyLong_Check(seed_o))
        return PyErr_Format(PyExc_TypeError, "seed must be an integer, got %s", Py_TYPE(seed_o)->tp_name);
    unsigned long long seed = PyLong_AsUnsignedLongLong(seed_o);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "seed must be in [0, 2^64 - 1], got %S", seed_o);
    }
    const uint64_t total = moei2_combinations(self->cache.num_experts, r);
    if ((uint64_t)k_best > total) k_best = (int64_t)total;
    result_arrays out;
    moei2_status status = MOEI2_ERR_NOMEM;
    if (result_alloc(&out, k_best, MOEI2_MASK_WORDS(self->cache.num_experts), generations) == 0) {
        moei2_genetic_params params = {r, population, generations, elite, rate, k_best, threads};
        moei2_rng rng;
        moei2_rng_seed(&rng, (uint64_t)seed);
        Py_BEGIN_ALLOW_THREADS
        status = moei2_search_genetic(&self->cache, &params, &rng, &out.res);
        Py_END_ALLOW_THREADS
    }
    return result_finish(&out, status, "SearchCache.genetic");
}

/* ---- attributes -------------------------------------------------------------------------- */

static PyObject *get_num_tokens(CacheObject *s, void *x) { return PyLong_FromLongLong(s->cache.num_tokens); }
static PyObject *get_num_experts(CacheObject *s, void *x) { return PyLong_FromLongLong(s->cache.num_experts); }
static PyObject *get_top_k(CacheObject *s, void *x) { return PyLong_FromLongLong(s->cache.top_k); }
static PyObject *get_r_max(CacheObject *s, void *x) { return PyLong_FromLongLong(s->r_max); }
static PyObject *get_num_candidates(CacheObject *s, void *x) { return PyLong_FromLongLong(s->cache.num_candidates); }
static PyObject *get_renormalize(CacheObject *s, void *x) { return PyBool_FromLong(s->cache.renormalize); }
static PyObject *get_scaling(CacheObject *s, void *x) { return PyFloat_FromDouble(s->cache.scaling); }
static PyObject *get_factored(CacheObject *s, void *x) { return PyLong_FromLongLong(s->factored); }
static PyObject *get_qr_tokens(CacheObject *s, void *x) { return PyLong_FromLongLong(s->qr_tokens); }
static PyObject *get_memory_bytes(CacheObject *s, void *x) { return PyLong_FromLongLong(s->bytes); }
static PyObject *get_batch_ends(CacheObject *s, void *x) {
    npy_intp n = s->cache.num_batches;
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT64);
    if (a) memcpy(PyArray_DATA(a), s->batch_ends, (size_t)n * sizeof(int64_t));
    return (PyObject *)a;
}

static PyGetSetDef cache_getset[] = {
    {"num_tokens", (getter)get_num_tokens, NULL, "N", NULL},
    {"num_experts", (getter)get_num_experts, NULL, "E", NULL},
    {"top_k", (getter)get_top_k, NULL, "k", NULL},
    {"r_max", (getter)get_r_max, NULL, "the most experts a mask may drop", NULL},
    {"num_candidates", (getter)get_num_candidates, NULL, "C = top_k + r_max", NULL},
    {"renormalize", (getter)get_renormalize, NULL, "whether the top-k weights are renormalised", NULL},
    {"scaling_factor", (getter)get_scaling, NULL, "routing weight scale", NULL},
    {"factored", (getter)get_factored, NULL, "tokens factored so far (searches need all)", NULL},
    {"qr_tokens", (getter)get_qr_tokens, NULL, "tokens factored by QR (ill-conditioned Gram)", NULL},
    {"memory_bytes", (getter)get_memory_bytes, NULL, "bytes held by the cache", NULL},
    {"batch_ends", (getter)get_batch_ends, NULL, "a copy of the batch ends", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef cache_methods[] = {
    {"candidates", KW cache_candidates, METH_VARARGS | METH_KEYWORDS,
     "candidates(first, count) -> int64 [count, C]: each token's candidate experts by descending logit."},
    {"factor_outputs", KW cache_factor_outputs, METH_VARARGS | METH_KEYWORDS,
     "factor_outputs(outputs [n, C, d], first, num_threads) -> n: factors the next chunk of tokens."},
    {"factor_moe", KW cache_factor_moe, METH_VARARGS | METH_KEYWORDS,
     "factor_moe(X, gate_up_proj, down_proj, first, count, num_threads) -> count: computes the candidate "
     "outputs of SiLU experts (float32) for the next chunk and factors them."},
    {"loss", KW cache_loss, METH_VARARGS | METH_KEYWORDS, "loss(masks uint64 [M, W], num_threads) -> float64 [M]."},
    {"importance", KW cache_importance, METH_VARARGS | METH_KEYWORDS, "importance(num_threads) -> float64 [E]."},
    {"greedy", KW cache_greedy, METH_VARARGS | METH_KEYWORDS, "greedy(r, num_threads) -> dict."},
    {"exhaustive", KW cache_exhaustive, METH_VARARGS | METH_KEYWORDS, "exhaustive(r, k_best, num_threads) -> dict."},
    {"genetic", KW cache_genetic, METH_VARARGS | METH_KEYWORDS,
     "genetic(*, r, k_best, population, generations, elite_count, mutation_rate, seed, num_threads) -> dict."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "moei2._core.SearchCache",
    .tp_doc = "SearchCache(router_logits, *, top_k, r_max, renormalize, scaling_factor, batch_ends): one MoE "
              "layer's search cache, owned in C memory (see moei2.search.Layer).",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = cache_new,
    .tp_dealloc = (destructor)cache_dealloc,
    .tp_methods = cache_methods,
    .tp_getset = cache_getset,
};

/* ---- candidate outputs on their own ------------------------------------------------------- */

static PyObject *py_candidate_outputs(PyObject *mod, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"X", "candidates", "gate_up_proj", "down_proj", "num_threads", NULL};
    PyObject *x_o, *cand_o, *gu_o, *dn_o, *threads_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO", kwlist, &x_o, &cand_o, &gu_o, &dn_o, &threads_o))
        return NULL;
    int threads;
    if (glue_threads(threads_o, &threads) < 0) return NULL;
    PyArrayObject *cand = glue_check_array(cand_o, "candidates", NPY_INT64, 2, 0);
    if (!cand) return NULL;
    PyArrayObject *gu0 = glue_check_array(gu_o, "gate_up_proj", NPY_FLOAT32, 3, 0);
    if (!gu0) return NULL;
    const int64_t E = PyArray_DIM(gu0, 0), n = PyArray_DIM(cand, 0), C = PyArray_DIM(cand, 1);
    PyArrayObject *x, *gu, *dn;
    int64_t H, F;
    if (experts_check(x_o, gu_o, dn_o, E, &x, &gu, &dn, &H, &F) < 0) return NULL;
    if (E < 1 || PyArray_DIM(x, 0) != n || C < 1)
        return PyErr_Format(PyExc_ValueError, "candidates must be [n, C >= 1] with n = X's %zd rows and X, "
                            "gate_up_proj non-empty", (Py_ssize_t)PyArray_DIM(x, 0));
    int64_t nc;
    int32_t *ids = moei2_mul_ok(n, C, &nc) ? NULL : moei2_alloc(nc, sizeof(int32_t));
    if (!ids) return PyErr_NoMemory();
    const int64_t *src = PyArray_DATA(cand);
    for (int64_t i = 0; i < nc; i++) {
        if (src[i] < 0 || src[i] >= E) {
            free(ids);
            return PyErr_Format(PyExc_ValueError, "candidates must hold expert ids in [0, %lld), got %lld",
                                (long long)E, (long long)src[i]);
        }
        ids[i] = (int32_t)src[i];
    }
    npy_intp dims[3] = {(npy_intp)n, (npy_intp)C, (npy_intp)H};
    PyArrayObject *out = (PyArrayObject *)PyArray_ZEROS(3, dims, NPY_FLOAT32, 0);
    if (!out) {
        free(ids);
        return NULL;
    }
    moei2_expert_outputs_job job = {n, C, E, H, F, PyArray_DATA(x), ids, PyArray_DATA(gu), PyArray_DATA(dn),
                                    PyArray_DATA(out)};
    moei2_status status;
    Py_BEGIN_ALLOW_THREADS
    status = moei2_candidate_outputs(&job, threads);
    Py_END_ALLOW_THREADS
    free(ids);
    if (status != MOEI2_OK) {
        Py_DECREF(out);
        return glue_raise_status(status, "candidate_outputs");
    }
    return (PyObject *)out;
}

PyMethodDef glue_search_methods[] = {
    {"candidate_outputs", KW py_candidate_outputs, METH_VARARGS | METH_KEYWORDS,
     "candidate_outputs(X [n, H], candidates int64 [n, C], gate_up_proj [E, 2I, H], down_proj [E, H, I], "
     "num_threads) -> float32 [n, C, H]: outputs of SiLU-gated experts."},
    {NULL, NULL, 0, NULL},
};

int glue_search_add_types(PyObject *module) {
    if (PyType_Ready(&CacheType) < 0) return -1;
    Py_INCREF(&CacheType);
    if (PyModule_AddObject(module, "SearchCache", (PyObject *)&CacheType) < 0) {
        Py_DECREF(&CacheType);
        return -1;
    }
    return 0;
}
