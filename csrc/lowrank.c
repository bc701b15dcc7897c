/* Truncation-aware low-rank decomposition (SVD-LLM's objective, solved without Cholesky) and the
 * importance-driven rank allocation of MoE-I2.
 *
 * The maths. With G = X^T X = L L^T for any factor L (singular G allowed),
 * ||(W - W') X||_F = ||(W - W') L||_F, whose rank-r minimiser is W' = U_r U_r^T W with U_r the
 * top-r left singular vectors of W L, i.e. the top-r eigenvectors of W G W^T. The minimum is the
 * square root of the sum of the discarded eigenvalues. Nothing needs a factor of G, so singular,
 * rank-deficient and all-zero Grams (rarely routed experts) are ordinary input, and no inverse is
 * ever formed.
 *
 * The smaller side. For m <= n the m x m matrix W G W^T is formed directly. For m > n the
 * Householder QR W = Q R gives W G W^T = Q (R G R^T) Q^T, so the n x n matrix R G R^T has the
 * same non-zero spectrum; its eigenvectors V give U = Q V and B = U^T W = V^T R.
 *
 * Precision. Everything that touches G runs in float64: with a few outlier channels the Gram's
 * condition number reaches 1e8 and more, and a float32 product would add rounding of order
 * 6e-8 * lambda_max to every entry, which swamps the discarded eigenvalues we must sum. The
 * eigenvalues of the float64 matrix are accurate to ~1e-16 * lambda_max, so the loss keeps ~1e-6
 * relative accuracy even when the discarded spectrum is 1e-8 of the largest eigenvalue. Only
 * B = A^T W for a float32 weight uses sgemm, from the float32 A that is returned: its error is of
 * the order of the final rounding of B to float32 anyway.
 *
 * The discarded eigenvalues come from dsterf on the tridiagonal form and are summed directly,
 * smallest first; the loss is never computed as "total minus kept", which would cancel.
 *
 * Determinism. The result must not depend on the number of threads, so that one call and a
 * parallel batch agree bit for bit. OpenBLAS's threaded routines do not guarantee that (its
 * threaded level-2 routines sum per-thread partial vectors, and even level-3 results were seen
 * to change with the thread count), so BLAS runs single-threaded throughout, and a single
 * decomposition parallelises itself: every large level-3 step (G W^T, the triangle of W G W^T,
 * R G R^T, the back-transformations, B) is split into fixed blocks of independent columns or
 * rows whose size depends only on the problem, each computed by a single-threaded BLAS or
 * LAPACK call, on as many threads as the caller's BLAS thread count. Which thread computes a
 * block changes nothing. dsytrd and dgeqrf run as one call on one thread. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_blas.h"
#include "moei2_core.h"
#include "moei2_internal.h"

/* Columns of W G W^T formed per dgemm call when only its upper triangle is needed: narrow enough
 * to skip most of the lower half (about (1 + 1/blocks)/2 of the full product), wide enough for
 * dgemm to stay efficient. */
#define TRIANGLE_BLOCK 256

/* Eigenvalues below -INDEFINITE_TOLERANCE * scale mean the Gram is not positive semidefinite;
 * smaller negative values are rounding (a float32-rounded Gram with condition 1e8 gives ~1e-7). */
#define INDEFINITE_TOLERANCE 1e-4

static double *alloc_doubles(int64_t count) {
    if (count < 0 || (uint64_t)count > SIZE_MAX / sizeof(double)) return NULL;
    return (double *)malloc((size_t)(count > 0 ? count : 1) * sizeof(double));
}

/* Block size of the thread-count independent partitions (see "Determinism"); wide enough for
 * the BLAS kernels to run at full speed. */
#define PAR_BLOCK 128

/* C[:, cols] = alpha op(A) op(B)[:, cols] (column-major), float64 or float32. */
typedef struct {
    int single;
    CBLAS_TRANSPOSE ta, tb;
    int64_t m, k;
    const void *a, *b;
    void *c;
    int64_t lda, ldb, ldc;
} gemm_ctx;

static int gemm_block(void *arg, int64_t j0, int64_t j1) {
    const gemm_ctx *g = (const gemm_ctx *)arg;
    int64_t boff = g->tb == CblasNoTrans ? j0 * g->ldb : j0;
    if (g->single)
        BLASFN(cblas_sgemm)(CblasColMajor, g->ta, g->tb, (blasint)g->m, (blasint)(j1 - j0), (blasint)g->k, 1.0f,
                            (const float *)g->a, (blasint)g->lda, (const float *)g->b + boff, (blasint)g->ldb, 0.0f,
                            (float *)g->c + j0 * g->ldc, (blasint)g->ldc);
    else
        BLASFN(cblas_dgemm)(CblasColMajor, g->ta, g->tb, (blasint)g->m, (blasint)(j1 - j0), (blasint)g->k, 1.0,
                            (const double *)g->a, (blasint)g->lda, (const double *)g->b + boff, (blasint)g->ldb, 0.0,
                            (double *)g->c + j0 * g->ldc, (blasint)g->ldc);
    return 0;
}

/* In-place triangular product with the upper triangular t (order `order`): side Left multiplies
 * the columns of x one by one (split by columns), side Right the rows (split by rows). */
typedef struct {
    CBLAS_SIDE side;
    CBLAS_TRANSPOSE trans;
    int64_t order, other; /* other: the columns (Left) or rows (Right) of x */
    const double *t;
    double *x;
    int64_t ldx;
} trmm_ctx;

static int trmm_block(void *arg, int64_t i0, int64_t i1) {
    const trmm_ctx *c = (const trmm_ctx *)arg;
    if (c->side == CblasLeft)
        BLASFN(cblas_dtrmm)(CblasColMajor, CblasLeft, CblasUpper, c->trans, CblasNonUnit, (blasint)c->order,
                            (blasint)(i1 - i0), 1.0, c->t, (blasint)c->order, c->x + i0 * c->ldx, (blasint)c->ldx);
    else
        BLASFN(cblas_dtrmm)(CblasColMajor, CblasRight, CblasUpper, c->trans, CblasNonUnit, (blasint)(i1 - i0),
                            (blasint)c->order, 1.0, c->t, (blasint)c->order, c->x + i0, (blasint)c->ldx);
    return 0;
}

static void trmm_par(int threads, CBLAS_SIDE side, CBLAS_TRANSPOSE trans, int64_t order, int64_t other,
                     const double *t, double *x, int64_t ldx) {
    trmm_ctx c = {.side = side, .trans = trans, .order = order, .other = other, .t = t, .x = x, .ldx = ldx};
    moei2_par_for(threads, other, PAR_BLOCK, trmm_block, &c);
}

/* Applies the orthogonal matrix of dsytrd (dormtr) or dgeqrf (dormqr) to columns of c. */
typedef struct {
    int tridiagonal; /* 1: dormtr, 0: dormqr */
    int64_t rows, reflectors;
    const double *factors;
    int64_t ldf;
    const double *tau;
    double *c;
    int64_t ldc;
} orm_ctx;

static int orm_block(void *arg, int64_t j0, int64_t j1) {
    const orm_ctx *o = (const orm_ctx *)arg;
    lapack_int info;
    if (o->tridiagonal)
        info = BLASFN(LAPACKE_dormtr)(LAPACK_COL_MAJOR, 'L', 'U', 'N', (lapack_int)o->rows, (lapack_int)(j1 - j0),
                                      (double *)o->factors, (lapack_int)o->ldf, o->tau, o->c + j0 * o->ldc,
                                      (lapack_int)o->ldc);
    else
        info = BLASFN(LAPACKE_dormqr)(LAPACK_COL_MAJOR, 'L', 'N', (lapack_int)o->rows, (lapack_int)(j1 - j0),
                                      (lapack_int)o->reflectors, o->factors, (lapack_int)o->ldf, o->tau,
                                      o->c + j0 * o->ldc, (lapack_int)o->ldc);
    return (int)info;
}

static int all_finite(const double *x, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* dst (cols x rows, column-major with leading dimension ld) = src^T, for a row-major rows x cols
 * float32 or float64 source: i.e. the column-major copy of the same matrix, in float64. Blocked so
 * both sides stay in cache. */
static void to_column_major(const void *src, moei2_dtype dtype, int64_t rows, int64_t cols, double *dst) {
    const int64_t bs = 32;
    for (int64_t i0 = 0; i0 < rows; i0 += bs) {
        int64_t i1 = i0 + bs < rows ? i0 + bs : rows;
        for (int64_t j0 = 0; j0 < cols; j0 += bs) {
            int64_t j1 = j0 + bs < cols ? j0 + bs : cols;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++)
                    dst[i + j * rows] = dtype == MOEI2_FLOAT32 ? (double)((const float *)src)[i * cols + j]
                                                               : ((const double *)src)[i * cols + j];
        }
    }
}

/* ---- the symmetric eigenproblem ------------------------------------------------------------ */

typedef struct {
    int64_t k, r;      /* matrix size, eigenvectors wanted */
    double *values;    /* out: all k eigenvalues, ascending */
    double *vectors;   /* out: k x r column-major, eigenvectors of the r largest, descending */
    int threads;
} eig_result;

/* Copies the top r columns of a k x k ascending eigenvector matrix into out, largest first. */
static void take_top_descending(const double *full, int64_t k, int64_t r, int64_t ncols, double *out) {
    for (int64_t c = 0; c < r; c++)
        memcpy(out + c * k, full + (ncols - 1 - c) * k, (size_t)k * sizeof(double));
}

/* dsytrd + dsterf + dstemr + dormtr. s (upper triangle) is destroyed. Returns 0 or the failing
 * routine's info with its name in *what. */
static int eig_mrrr(double *s, eig_result *res, const char **what) {
    const int64_t k = res->k, r = res->r;
    lapack_int info = 0, found = 0;
    lapack_logical tryrac = 1;
    double *d = alloc_doubles(k), *e = alloc_doubles(k), *tau = alloc_doubles(k);
    double *d2 = alloc_doubles(k), *e2 = alloc_doubles(k), *w = alloc_doubles(k);
    double *z = alloc_doubles(k * r);
    lapack_int *isuppz = (lapack_int *)malloc((size_t)(2 * (r > 0 ? r : 1)) * sizeof(lapack_int));
    if (!d || !e || !tau || !d2 || !e2 || !w || !z || !isuppz) {
        *what = "malloc";
        info = -1000;
        goto done;
    }
    info = BLASFN(LAPACKE_dsytrd)(LAPACK_COL_MAJOR, 'U', (lapack_int)k, s, (lapack_int)k, d, e, tau);
    if (info != 0) { *what = "dsytrd"; goto done; }
    e[k - 1] = 0.0;
    memcpy(d2, d, (size_t)k * sizeof(double));
    memcpy(e2, e, (size_t)k * sizeof(double));
    info = BLASFN(LAPACKE_dsterf)((lapack_int)k, d2, e2);
    if (info != 0) { *what = "dsterf"; goto done; }
    memcpy(res->values, d2, (size_t)k * sizeof(double));
    /* dstemr destroys d and e; they are not needed afterwards. */
    info = BLASFN(LAPACKE_dstemr)(LAPACK_COL_MAJOR, 'V', 'I', (lapack_int)k, d, e, 0.0, 0.0, (lapack_int)(k - r + 1),
                                  (lapack_int)k, &found, w, z, (lapack_int)k, (lapack_int)r, isuppz, &tryrac);
    if (info == 0 && found != r) info = -2000;
    if (info != 0) { *what = "dstemr"; goto done; }
    orm_ctx orm = {.tridiagonal = 1, .rows = k, .factors = s, .ldf = k, .tau = tau, .c = z, .ldc = k};
    info = moei2_par_for(res->threads, r, PAR_BLOCK, orm_block, &orm);
    if (info != 0) { *what = "dormtr"; goto done; }
    take_top_descending(z, k, r, r, res->vectors);
done:
    free(d); free(e); free(tau); free(d2); free(e2); free(w); free(z); free(isuppz);
    return (int)info;
}

/* dsyevd or dsyev on s (destroyed): every eigenvector, of which the top r are kept. */
static int eig_full(double *s, eig_result *res, int divide_conquer, const char **what) {
    const int64_t k = res->k;
    lapack_int info;
    double *w = alloc_doubles(k);
    if (!w) { *what = "malloc"; return -1000; }
    if (divide_conquer) {
        *what = "dsyevd";
        info = BLASFN(LAPACKE_dsyevd)(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)k, s, (lapack_int)k, w);
    } else {
        *what = "dsyev";
        info = BLASFN(LAPACKE_dsyev)(LAPACK_COL_MAJOR, 'V', 'U', (lapack_int)k, s, (lapack_int)k, w);
    }
    if (info == 0) {
        memcpy(res->values, w, (size_t)k * sizeof(double));
        take_top_descending(s, k, res->r, k, res->vectors);
    }
    free(w);
    return (int)info;
}

static const char *solver_name(moei2_eig_solver solver) {
    switch (solver) {
    case MOEI2_EIG_MRRR: return "dsytrd+dstemr";
    case MOEI2_EIG_DIVIDE_CONQUER: return "dsyevd";
    default: return "dsyev";
    }
}

/* ---- one decomposition ---------------------------------------------------------------------- */

typedef struct {
    const moei2_lowrank_job *job;
    int64_t m, n, r, k;      /* k: size of the eigenproblem */
    const double *gram;      /* NULL for the plain SVD */
    const double *wt;        /* m <= n: W^T column-major (n x m) = W row-major, in float64 */
    double *wt_owned;
    double *gwt;             /* m <= n with a Gram: G W^T (n x m) */
    double *qr;              /* m > n: dgeqrf output (m x n, column-major) */
    double *tau;
    double *rfac;            /* m > n: R (n x n, upper, column-major) */
    int threads;
} problem;

static void problem_free(problem *p) {
    free(p->wt_owned);
    free(p->gwt);
    free(p->qr);
    free(p->tau);
    free(p->rfac);
}

/* The work that does not depend on the eigensolver: W in float64, G W^T, or the QR factors. */
static moei2_status problem_prepare(problem *p) {
    const int64_t m = p->m, n = p->n;
    if (m <= n) {
        if (p->job->dtype == MOEI2_FLOAT64) {
            p->wt = (const double *)p->job->weight;
        } else {
            p->wt_owned = alloc_doubles(m * n);
            if (!p->wt_owned) return MOEI2_ERR_NOMEM;
            const float *w = (const float *)p->job->weight;
            for (int64_t i = 0; i < m * n; i++) p->wt_owned[i] = (double)w[i];
            p->wt = p->wt_owned;
        }
        if (p->gram) {
            p->gwt = alloc_doubles(n * m);
            if (!p->gwt) return MOEI2_ERR_NOMEM;
            gemm_ctx g = {.ta = CblasNoTrans, .tb = CblasNoTrans, .m = n, .k = n, .a = p->gram, .lda = n,
                          .b = p->wt, .ldb = n, .c = p->gwt, .ldc = n};
            moei2_par_for(p->threads, m, PAR_BLOCK, gemm_block, &g);
        }
        return MOEI2_OK;
    }
    p->qr = alloc_doubles(m * n);
    p->tau = alloc_doubles(n);
    p->rfac = alloc_doubles(n * n);
    if (!p->qr || !p->tau || !p->rfac) return MOEI2_ERR_NOMEM;
    to_column_major(p->job->weight, p->job->dtype, m, n, p->qr);
    lapack_int info = BLASFN(LAPACKE_dgeqrf)(LAPACK_COL_MAJOR, (lapack_int)m, (lapack_int)n, p->qr, (lapack_int)m,
                                             p->tau);
    if (info != 0) return MOEI2_ERR_LAPACK; /* dgeqrf fails only on bad arguments or memory */
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < n; i++) p->rfac[i + j * n] = i <= j ? p->qr[i + j * m] : 0.0;
    return MOEI2_OK;
}

/* Writes the upper triangle of the k x k symmetric matrix whose eigenvectors we need into s:
 * W G W^T (m <= n) or R G R^T (m > n); G = I without a Gram. Called again for each fallback
 * solver, since the solvers destroy s. */
typedef struct {
    const problem *p;
    double *s;
} triangle_ctx;

/* s[0:j1, j0:j1] = W[0:j1, :] (G W^T)[:, j0:j1] (G = I without a Gram). */
static int triangle_block(void *arg, int64_t j0, int64_t j1) {
    const triangle_ctx *t = (const triangle_ctx *)arg;
    const problem *p = t->p;
    const double *right = p->gwt ? p->gwt : p->wt;
    BLASFN(cblas_dgemm)(CblasColMajor, CblasTrans, CblasNoTrans, (blasint)j1, (blasint)(j1 - j0), (blasint)p->n, 1.0,
                        p->wt, (blasint)p->n, right + j0 * p->n, (blasint)p->n, 0.0, t->s + j0 * p->m,
                        (blasint)p->m);
    return 0;
}

static void problem_form(const problem *p, double *s) {
    const int64_t m = p->m, n = p->n;
    if (m <= n) {
        /* The upper triangle, block column by block column. */
        triangle_ctx t = {.p = p, .s = s};
        moei2_par_for(p->threads, m, TRIANGLE_BLOCK, triangle_block, &t);
        return;
    }
    /* R G R^T (R R^T without a Gram) by products with the triangular R, never dlauum, whose
     * unblocked part uses level-2 BLAS. */
    memcpy(s, p->gram ? p->gram : p->rfac, (size_t)(n * n) * sizeof(double));
    if (p->gram) trmm_par(p->threads, CblasLeft, CblasNoTrans, n, n, p->rfac, s, n);
    trmm_par(p->threads, CblasRight, CblasTrans, n, n, p->rfac, s, n);
}

/* A = U_r and B = U_r^T W from the eigenvectors v (k x r, column-major, descending). */
static moei2_status problem_factors(const problem *p, const double *v) {
    const moei2_lowrank_job *job = p->job;
    const int64_t m = p->m, n = p->n, r = p->r;
    if (m <= n) {
        /* A row-major m x r is the column-major r x m matrix U_r^T. */
        if (job->dtype == MOEI2_FLOAT32) {
            float *a = (float *)job->a;
            for (int64_t c = 0; c < r; c++)
                for (int64_t i = 0; i < m; i++) a[i * r + c] = (float)v[i + c * m];
            /* B row-major r x n is the column-major n x r matrix W^T A: computed from the returned
             * float32 A, so that A B is exactly the projection of W onto span(A) up to sgemm rounding. */
            gemm_ctx g = {.single = 1, .ta = CblasNoTrans, .tb = CblasTrans, .m = n, .k = m, .a = job->weight,
                          .lda = n, .b = a, .ldb = r, .c = job->b, .ldc = n};
            moei2_par_for(p->threads, r, PAR_BLOCK, gemm_block, &g);
        } else {
            double *a = (double *)job->a;
            for (int64_t c = 0; c < r; c++)
                for (int64_t i = 0; i < m; i++) a[i * r + c] = v[i + c * m];
            gemm_ctx g = {.ta = CblasNoTrans, .tb = CblasTrans, .m = n, .k = m, .a = p->wt, .lda = n, .b = a,
                          .ldb = r, .c = job->b, .ldc = n};
            moei2_par_for(p->threads, r, PAR_BLOCK, gemm_block, &g);
        }
        return MOEI2_OK;
    }
    /* U_r = Q [V_r; 0] and B = V_r^T R (= U_r^T Q R = U_r^T W). */
    double *u = alloc_doubles(m * r), *bt = alloc_doubles(n * r);
    if (!u || !bt) {
        free(u);
        free(bt);
        return MOEI2_ERR_NOMEM;
    }
    for (int64_t c = 0; c < r; c++) {
        memcpy(u + c * m, v + c * n, (size_t)n * sizeof(double));
        memset(u + c * m + n, 0, (size_t)(m - n) * sizeof(double));
    }
    memcpy(bt, v, (size_t)(n * r) * sizeof(double));
    orm_ctx orm = {.rows = m, .reflectors = n, .factors = p->qr, .ldf = m, .tau = p->tau, .c = u, .ldc = m};
    int info = moei2_par_for(p->threads, r, PAR_BLOCK, orm_block, &orm);
    if (info != 0) {
        free(u);
        free(bt);
        return info == LAPACK_WORK_MEMORY_ERROR ? MOEI2_ERR_NOMEM : MOEI2_ERR_LAPACK;
    }
    /* bt (n x r column-major) = R^T V_r: the memory of B row-major r x n. */
    trmm_par(p->threads, CblasLeft, CblasTrans, n, r, p->rfac, bt, n);
    if (job->dtype == MOEI2_FLOAT32) {
        float *a = (float *)job->a, *b = (float *)job->b;
        for (int64_t c = 0; c < r; c++)
            for (int64_t i = 0; i < m; i++) a[i * r + c] = (float)u[i + c * m];
        for (int64_t i = 0; i < n * r; i++) b[i] = (float)bt[i];
    } else {
        double *a = (double *)job->a;
        for (int64_t c = 0; c < r; c++)
            for (int64_t i = 0; i < m; i++) a[i * r + c] = u[i + c * m];
        memcpy(job->b, bt, (size_t)(n * r) * sizeof(double));
    }
    free(u);
    free(bt);
    return MOEI2_OK;
}

static int factors_finite(const moei2_lowrank_job *job) {
    int64_t na = job->rows * job->rank, nb = job->rank * job->cols;
    if (job->dtype == MOEI2_FLOAT64) return all_finite(job->a, na) && all_finite(job->b, nb);
    const float *a = (const float *)job->a, *b = (const float *)job->b;
    for (int64_t i = 0; i < na; i++)
        if (!isfinite(a[i])) return 0;
    for (int64_t i = 0; i < nb; i++)
        if (!isfinite(b[i])) return 0;
    return 1;
}

static int gram_all_zero(const double *g, int64_t n) {
    for (int64_t i = 0; i < n * n; i++)
        if (g[i] != 0.0) return 0;
    return 1;
}

/* Squared Frobenius norm of the weight: the scale against which an eigenvalue of a zero-ish
 * W G W^T is judged (together with the Gram's largest diagonal entry). */
static double weight_norm2(const moei2_lowrank_job *job) {
    double sum = 0.0;
    int64_t count = job->rows * job->cols;
    if (job->dtype == MOEI2_FLOAT32) {
        const float *w = (const float *)job->weight;
        for (int64_t i = 0; i < count; i++) sum += (double)w[i] * (double)w[i];
    } else {
        const double *w = (const double *)job->weight;
        for (int64_t i = 0; i < count; i++) sum += w[i] * w[i];
    }
    return sum;
}

static moei2_status decompose(moei2_lowrank_job *job, int threads) {
    moei2_lowrank_info *info = &job->info;
    memset(info, 0, sizeof(*info));
    const int64_t m = job->rows, n = job->cols, r = job->rank;
    if (!job->weight || !job->a || !job->b || m < 1 || n < 1 || r < 1 || r > (m < n ? m : n) || m > INT32_MAX ||
        n > INT32_MAX || (job->dtype != MOEI2_FLOAT32 && job->dtype != MOEI2_FLOAT64))
        return MOEI2_ERR_ARG;

    problem p = {.job = job, .m = m, .n = n, .r = r, .k = m <= n ? m : n, .gram = job->gram, .threads = threads};
    info->route = m <= n ? MOEI2_LOWRANK_ROUTE_LEFT_GRAM : MOEI2_LOWRANK_ROUTE_QR;
    if (p.gram && gram_all_zero(p.gram, n)) {
        /* Every W' is optimal (loss 0); the plain truncation is the sensible representative. */
        info->gram_is_zero = 1;
        p.gram = NULL;
    }
    info->whitened = p.gram != NULL;

    const int64_t k = p.k;
    double *s = alloc_doubles(k * k), *values = alloc_doubles(k), *vectors = alloc_doubles(k * r);
    moei2_status status = MOEI2_OK;
    if (!s || !values || !vectors) {
        status = MOEI2_ERR_NOMEM;
        goto done;
    }
    status = problem_prepare(&p);
    if (status != MOEI2_OK) goto done;

    eig_result res = {.k = k, .r = r, .values = values, .vectors = vectors, .threads = threads};
    int solved = 0;
    size_t used = 0;
    for (int solver = 0; solver < MOEI2_EIG_COUNT && !solved; solver++) {
        const char *what = solver_name((moei2_eig_solver)solver);
        int lapack_info;
        if (job->skip_solvers & (1u << solver)) {
            lapack_info = -3000;
        } else {
            problem_form(&p, s);
            double trace = 0.0;
            for (int64_t i = 0; i < k; i++) trace += s[i + i * k] > 0.0 ? s[i + i * k] : 0.0;
            info->energy = sqrt(trace);
            /* Finite inputs can still overflow in W G W^T; no solver can help then. */
            if (!isfinite(trace)) {
                status = MOEI2_ERR_NONFINITE;
                goto done;
            }
            lapack_info = solver == MOEI2_EIG_MRRR ? eig_mrrr(s, &res, &what)
                                                   : eig_full(s, &res, solver == MOEI2_EIG_DIVIDE_CONQUER, &what);
            if (lapack_info == -1000 || lapack_info == LAPACK_WORK_MEMORY_ERROR) {
                status = MOEI2_ERR_NOMEM;
                goto done;
            }
            if (lapack_info == 0 && !(all_finite(values, k) && all_finite(vectors, k * r))) lapack_info = -4000;
        }
        if (lapack_info == 0) {
            solved = 1;
            info->solver = (moei2_eig_solver)solver;
            if (solver > 0 && used < sizeof(info->fallback))
                snprintf(info->fallback + used, sizeof(info->fallback) - used, "; used %s",
                         solver_name((moei2_eig_solver)solver));
            break;
        }
        if (used < sizeof(info->fallback)) {
            const char *why = lapack_info == -3000   ? "skipped on request"
                              : lapack_info == -4000 ? "returned non-finite values"
                                                     : "failed";
            int written = snprintf(info->fallback + used, sizeof(info->fallback) - used, "%s%s %s (info=%d)",
                                   used ? "; " : "", what, why, lapack_info);
            if (written > 0) used += (size_t)written;
        }
    }
    if (!solved) {
        status = MOEI2_ERR_LAPACK;
        goto done;
    }

    /* The discarded spectrum: the k - r smallest eigenvalues (for m > n the other m - n are 0),
     * summed smallest first, each clamped at 0 (negative ones are rounding of a PSD matrix). */
    double discarded = 0.0;
    for (int64_t i = 0; i < k - r; i++) discarded += values[i] > 0.0 ? values[i] : 0.0;
    info->loss = sqrt(discarded);
    info->min_eigenvalue = values[0];
    info->max_eigenvalue = values[k - 1];
    if (values[0] < 0.0) {
        double diag_max = 0.0;
        if (p.gram)
            for (int64_t i = 0; i < n; i++) diag_max = fmax(diag_max, p.gram[i + i * n]);
        else
            diag_max = 1.0;
        double scale = fmax(values[k - 1], 1e-8 * weight_norm2(job) * diag_max);
        info->indefinite = values[0] < -INDEFINITE_TOLERANCE * scale;
    }
    if (info->gram_is_zero) {
        info->loss = 0.0;
        info->energy = 0.0;
        info->min_eigenvalue = 0.0;
        info->max_eigenvalue = 0.0;
    }

    status = problem_factors(&p, vectors);
    if (status == MOEI2_OK && !factors_finite(job)) status = MOEI2_ERR_NONFINITE;
done:
    problem_free(&p);
    free(s);
    free(values);
    free(vectors);
    return status;
}

moei2_status moei2_lowrank_decompose(moei2_lowrank_job *job) {
    if (!job) return MOEI2_ERR_ARG;
    int threads = moei2_blas_get_num_threads();
    if (threads < 1) threads = 1;
    moei2_blas_pin_single();
    job->status = decompose(job, threads);
    moei2_blas_unpin();
    return job->status;
}

/* ---- many decompositions in parallel --------------------------------------------------------- */

static int decompose_block(void *arg, int64_t begin, int64_t end) {
    moei2_lowrank_job *jobs = (moei2_lowrank_job *)arg;
    /* A failed job must not stop the others: each reports its own status. */
    for (int64_t i = begin; i < end; i++) jobs[i].status = decompose(&jobs[i], 1);
    return 0;
}

moei2_status moei2_lowrank_decompose_many(moei2_lowrank_job *jobs, int64_t count, int num_threads) {
    if (count < 0 || (count > 0 && !jobs) || num_threads < 1) return MOEI2_ERR_ARG;
    if (count == 0) return MOEI2_OK;
    moei2_blas_pin_single();
    moei2_par_for(num_threads, count, 1, decompose_block, jobs);
    moei2_blas_unpin();
    for (int64_t i = 0; i < count; i++)
        if (jobs[i].status != MOEI2_OK) return jobs[i].status;
    return MOEI2_OK;
}

/* ---- Gram sanity ------------------------------------------------------------------------------ */

int moei2_lowrank_check_gram(const double *g, int64_t n, int64_t *row, int64_t *col) {
    const double tol = 1e-3;
    double diag_max = 0.0;
    for (int64_t i = 0; i < n; i++) {
        if (g[i * n + i] < 0.0) {
            *row = *col = i;
            return 1;
        }
        diag_max = fmax(diag_max, g[i * n + i]);
    }
    /* An absolute floor so that rounding noise next to an all-zero row is not an error. */
    const double floor_abs = 1e-12 * diag_max;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = i + 1; j < n; j++) {
            double gij = g[i * n + j], gji = g[j * n + i];
            double bound = sqrt(g[i * n + i] * g[j * n + j]);
            if (fabs(gij - gji) > tol * bound + floor_abs) {
                *row = i;
                *col = j;
                return 2;
            }
            if (fabs(gij) > (1.0 + tol) * bound + floor_abs) {
                *row = i;
                *col = j;
                return 3;
            }
        }
    }
    return 0;
}

/* ---- rank allocation -------------------------------------------------------------------------- */

/* Min-heap or max-heap of expert indices keyed by t_j - r_j, ties to the lower index. The sign
 * selects the direction: +1 pops the largest key, -1 the smallest. */
typedef struct {
    int64_t *items;
    int64_t size;
    const double *share;
    const int64_t *ranks;
    int sign;
} rank_heap;

static int heap_before(const rank_heap *h, int64_t a, int64_t b) {
    double ka = h->sign * (h->share[a] - (double)h->ranks[a]);
    double kb = h->sign * (h->share[b] - (double)h->ranks[b]);
    if (ka != kb) return ka > kb;
    return a < b;
}

static void heap_sift_down(rank_heap *h, int64_t i) {
    for (;;) {
        int64_t best = i, left = 2 * i + 1, right = left + 1;
        if (left < h->size && heap_before(h, h->items[left], h->items[best])) best = left;
        if (right < h->size && heap_before(h, h->items[right], h->items[best])) best = right;
        if (best == i) return;
        int64_t tmp = h->items[i];
        h->items[i] = h->items[best];
        h->items[best] = tmp;
        i = best;
    }
}

static void heap_build(rank_heap *h) {
    for (int64_t i = h->size / 2 - 1; i >= 0; i--) heap_sift_down(h, i);
}

/* Moves `amount` units one at a time to (sign +1) or from (sign -1) the expert at the top of the
 * heap, dropping experts that reach their bound. */
static void heap_distribute(rank_heap *h, int64_t amount, int64_t *ranks, const int64_t *caps) {
    while (amount > 0 && h->size > 0) {
        int64_t j = h->items[0];
        ranks[j] += h->sign;
        amount--;
        int at_bound = h->sign > 0 ? ranks[j] >= caps[j] : ranks[j] <= 1;
        if (at_bound) h->items[0] = h->items[--h->size];
        heap_sift_down(h, 0);
    }
}

moei2_status moei2_allocate_ranks(const double *importance, const int64_t *rows, const int64_t *cols,
                                  int64_t count, double avg_rank, double keep_ratio, double alpha,
                                  double eps, int64_t *ranks, int64_t *budget_out, int64_t *cap_sum_out) {
    if (count < 1 || !importance || !rows || !cols || !ranks || !budget_out || !cap_sum_out) return MOEI2_ERR_ARG;
    if (!(isfinite(alpha) && alpha >= 0.0 && isfinite(eps) && eps >= 0.0)) return MOEI2_ERR_ARG;
    if ((avg_rank >= 0.0) == (keep_ratio >= 0.0)) return MOEI2_ERR_ARG; /* exactly one of the two */
    *budget_out = 0;
    *cap_sum_out = 0;

    int64_t *caps = (int64_t *)malloc((size_t)count * sizeof(int64_t));
    double *share = alloc_doubles(count);
    int64_t *items = (int64_t *)malloc((size_t)count * sizeof(int64_t));
    moei2_status status = MOEI2_OK;
    if (!caps || !share || !items) {
        status = MOEI2_ERR_NOMEM;
        goto done;
    }
    double dense = 0.0, perimeter = 0.0, top = 0.0;
    int64_t cap_sum = 0;
    for (int64_t j = 0; j < count; j++) {
        if (rows[j] < 1 || cols[j] < 1 || rows[j] > INT32_MAX || cols[j] > INT32_MAX || !isfinite(importance[j]) ||
            importance[j] < 0.0) {
            status = MOEI2_ERR_ARG;
            goto done;
        }
        int64_t cap = rows[j] * cols[j] / (rows[j] + cols[j]);
        caps[j] = cap > 1 ? cap : 1;
        cap_sum += caps[j];
        dense += (double)rows[j] * (double)cols[j];
        perimeter += (double)(rows[j] + cols[j]);
        top = fmax(top, importance[j] + eps);
    }
    *cap_sum_out = cap_sum;
    double average = avg_rank >= 0.0 ? avg_rank : keep_ratio * dense / perimeter;
    double target = average * (double)count;
    if (!(isfinite(target) && target > 0.0 && target < 9e18)) {
        status = MOEI2_ERR_ARG;
        goto done;
    }
    int64_t budget = (int64_t)floor(target + 0.5);
    /* keep_ratio 1 asks for every dense parameter, which the caps (floors of m n / (m + n)) fall
     * short of: it means every parameter a factorisation can hold. A smaller ratio the caps
     * cannot meet is refused, so that no budget is silently lowered. */
    if (keep_ratio >= 1.0 && budget > cap_sum) budget = cap_sum;
    *budget_out = budget;
    if (budget < count || budget > cap_sum) {
        status = MOEI2_ERR_ARG;
        goto done;
    }

    /* Weights relative to the largest, so pow() cannot overflow; top == 0 only when every
     * importance and eps are 0, and then (0/0)^alpha is treated as equal weights. */
    double total = 0.0;
    for (int64_t j = 0; j < count; j++) {
        share[j] = top > 0.0 ? pow((importance[j] + eps) / top, alpha) : 1.0;
        total += share[j];
    }
    if (!(total > 0.0)) { /* alpha > 0 with all-zero importance and eps = 0 */
        status = MOEI2_ERR_ARG;
        goto done;
    }
    int64_t sum = 0;
    for (int64_t j = 0; j < count; j++) {
        share[j] = share[j] / total * target;
        double f = floor(share[j]);
        int64_t r = f < 1.0 ? 1 : (f > (double)caps[j] ? caps[j] : (int64_t)f);
        ranks[j] = r;
        sum += r;
    }

    rank_heap heap = {.items = items, .share = share, .ranks = ranks};
    if (sum < budget) {
        heap.sign = +1;
        for (int64_t j = 0; j < count; j++)
            if (ranks[j] < caps[j]) items[heap.size++] = j;
        heap_build(&heap);
        heap_distribute(&heap, budget - sum, ranks, caps);
    } else if (sum > budget) {
        heap.sign = -1;
        for (int64_t j = 0; j < count; j++)
            if (ranks[j] > 1) items[heap.size++] = j;
        heap_build(&heap);
        heap_distribute(&heap, sum - budget, ranks, caps);
    }
done:
    free(caps);
    free(share);
    free(items);
    return status;
}
