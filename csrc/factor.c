/* The search cache's per-token factors, and the candidate expert outputs they are made from.
 *
 * Factor: for each token, R upper triangular with R^T R = O O^T, O the C x d matrix of its
 * candidate outputs. The level-3 route forms the Gram G = O O^T in float64 with one dsyrk per
 * token and factors it by Cholesky: C(C+1)d flops per token at dsyrk's rate, against dgeqrf's
 * 2C^2 d at level-2 rate. Forming G squares the conditioning: the error of ||R c|| grows like
 * eps * (|O| |c| / ||O c||)^2 instead of eps * |O| |c| / ||O c|| for a QR of O itself. So each
 * token's Cholesky is accepted only when its reciprocal condition estimate (dpocon) is at least
 * GRAM_MIN_RCOND; otherwise (and when the Cholesky fails: rank-deficient O, d < C) that token
 * is factored by Householder QR of O, as before. Tokens are processed in blocks of fixed size
 * on the thread pool with single-threaded BLAS; every token's result depends on its own data
 * only, so the factors are bitwise the same at any thread count.
 *
 * Candidate outputs: per expert, the tokens holding it among their candidates are gathered,
 * h = x W_gu^T (sgemm), a = silu(gate) * up, o = a W_down^T (sgemm), and each row is written into
 * its token's candidate slot. Experts are independent blocks of the pool, each computed by one
 * thread in row panels of fixed size, so the result does not depend on the thread count. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_blas.h"
#include "moei2_core.h"
#include "moei2_internal.h"

/* cond(G) = cond(O)^2 <= 1e5 keeps the Gram route's error within about 1e5 eps ~ 2e-11 relative
 * for the worst coefficient vector, under the 1e-10 promised against the float64 oracle. */
#define GRAM_MIN_RCOND 1e-5
/* Tokens per pool block: enough work per block (~1 ms) to hide the hand-out. */
#define FACTOR_BLOCK 16

typedef struct {
    int64_t C, d, k;
    const float *f32;
    const double *f64;
    int renormalize;
    double scaling;
    const double *cprob;
    double *factor, *norm2;
    int64_t *block_qr;  /* [blocks] tokens of each block that took the QR route */
} factor_ctx;

/* Per-thread scratch of one block. */
typedef struct {
    double *a;     /* [d, C] column-major: the token's outputs */
    double *g;     /* [C, C] */
    double *tau, *work, *w;
    lapack_int lwork;
    double *pwork; /* [3C] for dpocon */
    lapack_int *iwork;
} factor_scratch;

static void factor_scratch_free(factor_scratch *s) {
    free(s->a); free(s->g); free(s->tau); free(s->work); free(s->w); free(s->pwork); free(s->iwork);
}

static moei2_status factor_scratch_alloc(factor_scratch *s, int64_t C, int64_t d, int64_t k) {
    memset(s, 0, sizeof *s);
    int64_t dc, cc;
    if (moei2_mul_ok(d, C, &dc) || moei2_mul_ok(C, C, &cc)) return MOEI2_ERR_NOMEM;
    s->a = moei2_alloc(dc, sizeof(double));
    s->g = moei2_alloc(cc, sizeof(double));
    s->tau = moei2_alloc(C, sizeof(double));
    s->w = moei2_alloc(k, sizeof(double));
    s->pwork = moei2_alloc(3 * C, sizeof(double));
    s->iwork = moei2_alloc(C, sizeof(lapack_int));
    if (!s->a || !s->g || !s->tau || !s->w || !s->pwork || !s->iwork) goto fail;
    double query = 0.0;
    lapack_int info = BLASFN(LAPACKE_dgeqrf_work)(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)C, s->a,
                                                  (lapack_int)d, s->tau, &query, -1);
    if (info != 0) { factor_scratch_free(s); return MOEI2_ERR_LAPACK; }
    s->lwork = (lapack_int)query;
    if (s->lwork < (lapack_int)C) s->lwork = (lapack_int)C;
    s->work = moei2_alloc(s->lwork, sizeof(double));
    if (!s->work) goto fail;
    return MOEI2_OK;
fail:
    factor_scratch_free(s);
    return MOEI2_ERR_NOMEM;
}

/* Factors token n; 1 when it took the QR route, 0 for Cholesky, < 0 a status. */
static int factor_token(const factor_ctx *c, factor_scratch *s, int64_t n) {
    const int64_t C = c->C, d = c->d, k = c->k, P = MOEI2_PACKED_SIZE(C);
    /* The token's [C, d] row-major block is the d x C column-major matrix whose columns are the
     * candidate outputs. */
    int finite = 1;
    if (c->f32) {
        const float *src = c->f32 + n * C * d;
        for (int64_t i = 0; i < C * d; i++) {
            s->a[i] = (double)src[i];
            finite &= isfinite(src[i]) != 0;
        }
    } else {
        const double *src = c->f64 + n * C * d;
        memcpy(s->a, src, (size_t)(C * d) * sizeof(double));
        for (int64_t i = 0; i < C * d; i++) finite &= isfinite(src[i]) != 0;
    }
    if (!finite) return -(int)MOEI2_ERR_NONFINITE;
    double *r = c->factor + n * P;
    int qr = 1;
    if (d >= C) {
        BLASFN(cblas_dsyrk)(CblasColMajor, CblasUpper, CblasTrans, (blasint)C, (blasint)d, 1.0, s->a,
                            (blasint)d, 0.0, s->g, (blasint)C);
        double anorm = 0.0; /* 1-norm of the symmetric G from its upper triangle */
        for (int64_t j = 0; j < C; j++) {
            double col = 0.0;
            for (int64_t i = 0; i <= j; i++) col += fabs(s->g[j * C + i]);
            for (int64_t i = j + 1; i < C; i++) col += fabs(s->g[i * C + j]);
            if (col > anorm) anorm = col;
        }
        if (isfinite(anorm) && anorm > 0.0) {
            lapack_int info = BLASFN(LAPACKE_dpotrf_work)(LAPACK_COL_MAJOR, 'U', (lapack_int)C, s->g, (lapack_int)C);
            if (info == 0) {
                double rcond = 0.0;
                info = BLASFN(LAPACKE_dpocon_work)(LAPACK_COL_MAJOR, 'U', (lapack_int)C, s->g, (lapack_int)C, anorm,
                                                   &rcond, s->pwork, s->iwork);
                if (info == 0 && rcond >= GRAM_MIN_RCOND) {
                    for (int64_t j = 0; j < C; j++)
                        memcpy(r + MOEI2_PACKED_SIZE(j), s->g + j * C, (size_t)(j + 1) * sizeof(double));
                    qr = 0;
                }
            }
        }
    }
    if (qr) {
        lapack_int info = BLASFN(LAPACKE_dgeqrf_work)(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)C, s->a,
                                                      (lapack_int)d, s->tau, s->work, s->lwork);
        if (info != 0) return -(int)MOEI2_ERR_LAPACK;
        const int64_t rows = d < C ? d : C;
        for (int64_t j = 0; j < C; j++) {
            double *col = r + MOEI2_PACKED_SIZE(j);
            for (int64_t i = 0; i <= j; i++) col[i] = i < rows ? s->a[j * d + i] : 0.0;
        }
    }
    for (int64_t i = 0; i < P; i++)
        if (!isfinite(r[i])) return -(int)MOEI2_ERR_NONFINITE;
    /* ||y||^2 = ||R w||^2 with w the original top-k weights (the first k candidates). */
    const double *cp = c->cprob + n * C;
    double norm = 1.0;
    if (c->renormalize) {
        norm = 0.0;
        for (int64_t q = 0; q < k; q++) norm += cp[q];
    }
    for (int64_t q = 0; q < k; q++) s->w[q] = c->scaling * cp[q] / norm;
    double sum = 0.0;
    for (int64_t i = 0; i < k; i++) {
        double v = 0.0;
        for (int64_t j = i; j < k; j++) v += r[MOEI2_PACKED_SIZE(j) + i] * s->w[j];
        sum += v * v;
    }
    c->norm2[n] = sum;
    return qr;
}

static int factor_block(void *arg, int64_t first, int64_t last) {
    const factor_ctx *c = (const factor_ctx *)arg;
    factor_scratch s;
    moei2_status status = factor_scratch_alloc(&s, c->C, c->d, c->k);
    if (status != MOEI2_OK) return (int)status;
    int64_t qr = 0;
    int err = 0;
    for (int64_t n = first; n < last && !err; n++) {
        int got = factor_token(c, &s, n);
        if (got < 0) err = -got;
        else qr += got;
    }
    c->block_qr[first / FACTOR_BLOCK] = qr;
    factor_scratch_free(&s);
    return err;
}

moei2_status moei2_search_factor(int64_t num_tokens, int64_t num_candidates, int64_t dim,
                                 const float *outputs_f32, const double *outputs_f64, int64_t top_k,
                                 int renormalize, double scaling, const double *candidate_probs,
                                 double *factor, double *output_norm2, int num_threads,
                                 int64_t *qr_tokens) {
    const int64_t N = num_tokens, C = num_candidates, d = dim, k = top_k;
    if (N < 0 || C < 1 || d < 1 || k < 1 || k > C || (outputs_f32 == NULL) == (outputs_f64 == NULL))
        return MOEI2_ERR_ARG;
    int64_t cd;
    if (d > INT32_MAX || C > INT32_MAX || moei2_mul_ok(C, d, &cd) || cd > INT32_MAX) return MOEI2_ERR_ARG;
    if (qr_tokens) *qr_tokens = 0;
    if (N == 0) return MOEI2_OK;
    const int64_t blocks = N / FACTOR_BLOCK + (N % FACTOR_BLOCK != 0);
    int64_t *block_qr = moei2_calloc(blocks, sizeof(int64_t));
    if (!block_qr) return MOEI2_ERR_NOMEM;
    factor_ctx c = {C, d, k, outputs_f32, outputs_f64, renormalize, scaling, candidate_probs, factor,
                    output_norm2, block_qr};
    moei2_blas_pin_single();
    int err = moei2_par_for(num_threads, N, FACTOR_BLOCK, factor_block, &c);
    moei2_blas_unpin();
    if (qr_tokens)
        for (int64_t b = 0; b < blocks; b++) *qr_tokens += block_qr[b];
    free(block_qr);
    return (moei2_status)err;
}

/* ---- candidate outputs of SiLU-gated experts ------------------------------------------------ */

/* Rows of gathered tokens per pair of sgemm calls: bounds the scratch (panel x (2I + 2H) floats)
 * while keeping the products large enough for the BLAS kernels. */
#define EXPERT_PANEL 256

typedef struct {
    const moei2_expert_outputs_job *job;
    const int64_t *bounds; /* [E + 1] start of each expert's positions in order */
    const int64_t *order;  /* positions n * C + q grouped by expert, ascending within each */
} expert_ctx;

static int expert_block(void *arg, int64_t e0, int64_t e1) {
    const expert_ctx *c = (const expert_ctx *)arg;
    const moei2_expert_outputs_job *job = c->job;
    const int64_t H = job->hidden, F = job->inter, C = job->num_candidates;
    float *xg = moei2_alloc((int64_t)EXPERT_PANEL * H, sizeof(float));
    float *h = moei2_alloc((int64_t)EXPERT_PANEL * 2 * F, sizeof(float));
    float *act = moei2_alloc((int64_t)EXPERT_PANEL * F, sizeof(float));
    float *out = moei2_alloc((int64_t)EXPERT_PANEL * H, sizeof(float));
    int err = 0;
    if (!xg || !h || !act || !out) { err = MOEI2_ERR_NOMEM; goto done; }
    for (int64_t e = e0; e < e1; e++) {
        const float *gu = job->gate_up + e * 2 * F * H;
        const float *dn = job->down + e * H * F;
        for (int64_t p0 = c->bounds[e]; p0 < c->bounds[e + 1]; p0 += EXPERT_PANEL) {
            const int64_t rows = c->bounds[e + 1] - p0 < EXPERT_PANEL ? c->bounds[e + 1] - p0 : EXPERT_PANEL;
            for (int64_t i = 0; i < rows; i++)
                memcpy(xg + i * H, job->x + (c->order[p0 + i] / C) * H, (size_t)H * sizeof(float));
            /* h [rows, 2I] = xg [rows, H] gu^T, gu [2I, H] row-major */
            BLASFN(cblas_sgemm)(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)rows, (blasint)(2 * F),
                                (blasint)H, 1.0f, xg, (blasint)H, gu, (blasint)H, 0.0f, h, (blasint)(2 * F));
            for (int64_t i = 0; i < rows; i++) {
                const float *gate = h + i * 2 * F, *up = gate + F;
                float *a = act + i * F;
                for (int64_t j = 0; j < F; j++) a[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
            }
            /* out [rows, H] = act [rows, F] dn^T, dn [H, F] row-major */
            BLASFN(cblas_sgemm)(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)rows, (blasint)H, (blasint)F,
                                1.0f, act, (blasint)F, dn, (blasint)F, 0.0f, out, (blasint)H);
            for (int64_t i = 0; i < rows; i++)
                memcpy(job->outputs + c->order[p0 + i] * H, out + i * H, (size_t)H * sizeof(float));
        }
    }
done:
    free(xg); free(h); free(act); free(out);
    return err;
}

moei2_status moei2_candidate_outputs(const moei2_expert_outputs_job *job, int num_threads) {
    const int64_t n = job->num_tokens, C = job->num_candidates, E = job->num_experts;
    const int64_t H = job->hidden, F = job->inter;
    if (n < 0 || C < 1 || E < 1 || H < 1 || F < 1 || H > INT32_MAX || F > INT32_MAX / 2) return MOEI2_ERR_ARG;
    int64_t nc;
    if (moei2_mul_ok(n, C, &nc)) return MOEI2_ERR_NOMEM;
    if (nc == 0) return MOEI2_OK;
    int64_t *bounds = moei2_calloc(E + 1, sizeof(int64_t));
    int64_t *order = moei2_alloc(nc, sizeof(int64_t));
    int64_t *fill = moei2_alloc(E, sizeof(int64_t));
    moei2_status status = MOEI2_OK;
    if (!bounds || !order || !fill) { status = MOEI2_ERR_NOMEM; goto done; }
    /* Counting sort of the (token, slot) positions by expert, token order kept within each. */
    for (int64_t i = 0; i < nc; i++) {
        const int32_t e = job->candidates[i];
        if (e < 0 || e >= E) { status = MOEI2_ERR_ARG; goto done; }
        bounds[e + 1]++;
    }
    for (int64_t e = 0; e < E; e++) bounds[e + 1] += bounds[e];
    memcpy(fill, bounds, (size_t)E * sizeof(int64_t));
    for (int64_t i = 0; i < nc; i++) order[fill[job->candidates[i]]++] = i;
    {
        expert_ctx c = {job, bounds, order};
        moei2_blas_pin_single();
        int err = moei2_par_for(num_threads, E, 1, expert_block, &c);
        moei2_blas_unpin();
        status = (moei2_status)err;
    }
done:
    free(bounds); free(order); free(fill);
    return status;
}
