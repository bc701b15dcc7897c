/* The search cache's per-token factors, and the candidate expert outputs they are made from.
 *
 * Factor: for each token, R upper triangular with R^T R = O O^T, O the C x d matrix of its
 * candidate outputs. The level-3 route forms the Gram G = O O^T in float64 once per
 * token (a register-tiled kernel: for C ~ 20 the BLAS syrk/gemm entry overheads dominate) and
 * factors it by Cholesky: C(C+1)d flops per token at level-3 rate, against dgeqrf's 2C^2 d at
 * level-2 rate. Forming G squares the conditioning: the error of ||R c|| grows like
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
/* Columns of the outputs per pass: the C rows' slices of this length (C x 4 KiB) stay close to
 * the core while every tile that needs them reads them, and float32 rows are widened once per
 * pass rather than once per tile. */
enum { GRAM_CHUNK = 512 };

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
    double *a;     /* [d, C] column-major: a copy of the token's outputs for QR, on first use */
    int64_t dc;
    double *buf;   /* [ceil(C/4)*4, GRAM_CHUNK] widened row slices; the padding rows stay 0 */
    const double **rows; /* [ceil(C/4)*4] */
    double *g;     /* [C, C] */
    double *tau, *work, *w;
    lapack_int lwork;
    double *pwork; /* [3C] for dpocon */
    lapack_int *iwork;
} factor_scratch;

static void factor_scratch_free(factor_scratch *s) {
    free(s->a); free(s->buf); free(s->rows); free(s->g); free(s->tau); free(s->work); free(s->w); free(s->pwork); free(s->iwork);
}

static moei2_status factor_scratch_alloc(factor_scratch *s, int64_t C, int64_t d, int64_t k) {
    memset(s, 0, sizeof *s);
    int64_t dc, cc;
    if (moei2_mul_ok(d, C, &dc) || moei2_mul_ok(C, C, &cc)) return MOEI2_ERR_NOMEM;
    s->g = moei2_alloc(cc, sizeof(double));
    s->buf = moei2_calloc((C + 3) / 4 * 4 * GRAM_CHUNK, sizeof(double));
    s->rows = moei2_alloc((C + 3) / 4 * 4, sizeof(double *));
    s->tau = moei2_alloc(C, sizeof(double));
    s->w = moei2_alloc(k, sizeof(double));
    s->pwork = moei2_alloc(3 * C, sizeof(double));
    s->iwork = moei2_alloc(C, sizeof(lapack_int));
    if (!s->buf || !s->rows || !s->g || !s->tau || !s->w || !s->pwork || !s->iwork) goto fail;
    s->dc = dc;
    return MOEI2_OK;
fail:
    factor_scratch_free(s);
    return MOEI2_ERR_NOMEM;
}

/* out[4 i + j] = <a_i, b_j> for four rows a and four rows b of length d. Eight independent
 * lanes per product, summed in a fixed order at the end: the compiler maps the lanes onto vector
 * registers, and the result does not depend on which code path the CPU selects beyond FMA
 * rounding. The products of float32 values are exact in float64. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define GRAM_CLONES \
    __attribute__((target_clones("avx512f", "arch=haswell", "default"), optimize("fp-contract=fast")))
#else
#define GRAM_CLONES
#endif
enum { GRAM_LANES = 8 };
/* Sixteen named vector accumulators (GCC vector extensions) stay in registers; an array of
 * accumulators indexed in a loop was kept in memory, a load and a store per FMA. */
typedef double gram_vec __attribute__((vector_size(GRAM_LANES * sizeof(double))));
#define GRAM_LOAD(v, p) memcpy(&(v), (p), sizeof(gram_vec))

GRAM_CLONES
static void gram_4x4(const double *restrict const *a, const double *restrict const *b, int64_t d, double *out) {
    const double *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    const double *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    gram_vec c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0}, c6 = {0}, c7 = {0};
    gram_vec c8 = {0}, c9 = {0}, c10 = {0}, c11 = {0}, c12 = {0}, c13 = {0}, c14 = {0}, c15 = {0};
    int64_t t = 0;
    for (; t + GRAM_LANES <= d; t += GRAM_LANES) {
        gram_vec x0, x1, x2, x3, y0, y1, y2, y3;
        GRAM_LOAD(x0, a0 + t); GRAM_LOAD(x1, a1 + t); GRAM_LOAD(x2, a2 + t); GRAM_LOAD(x3, a3 + t);
        GRAM_LOAD(y0, b0 + t); GRAM_LOAD(y1, b1 + t); GRAM_LOAD(y2, b2 + t); GRAM_LOAD(y3, b3 + t);
        c0 += x0 * y0; c1 += x0 * y1; c2 += x0 * y2; c3 += x0 * y3;
        c4 += x1 * y0; c5 += x1 * y1; c6 += x1 * y2; c7 += x1 * y3;
        c8 += x2 * y0; c9 += x2 * y1; c10 += x2 * y2; c11 += x2 * y3;
        c12 += x3 * y0; c13 += x3 * y1; c14 += x3 * y2; c15 += x3 * y3;
    }
    double acc[16][GRAM_LANES];
    const gram_vec all[16] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15};
    memcpy(acc, all, sizeof acc);
    for (int l = 0; t < d; t++, l++) {
        const double x[4] = {a0[t], a1[t], a2[t], a3[t]}, y[4] = {b0[t], b1[t], b2[t], b3[t]};
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[4 * i + j][l] += x[i] * y[j];
    }
    for (int p = 0; p < 16; p++) {
        double sum = 0.0;
        for (int l = 0; l < GRAM_LANES; l++) sum += acc[p][l];
        out[p] = sum;
    }
}

/* Widens float32 to float64 with the same vector width as the tiles: the baseline x86-64 build
 * converts two values per instruction, which would cost as much as the tiles themselves. */
GRAM_CLONES
static void widen(const float *restrict src, double *restrict dst, int64_t n) {
    for (int64_t t = 0; t < n; t++) dst[t] = (double)src[t];
}

/* The upper triangle of G = A A^T (A: the token's C rows of length d, float32 or float64) into g
 * (C x C column-major), in passes over GRAM_CHUNK columns and 4 x 4 tiles per pass. buf holds
 * [ceil(C/4)*4, GRAM_CHUNK] doubles whose rows past C are zero; rows has room for ceil(C/4)*4
 * pointers. */
static void gram_upper(const float *a32, const double *a64, int64_t C, int64_t d, double *buf, const double **rows,
                       double *g) {
    double tile[16];
    for (int64_t j = 0; j < C; j++)
        for (int64_t i = 0; i <= j; i++) g[j * C + i] = 0.0;
    const int64_t Cp = (C + 3) / 4 * 4;
    for (int64_t t0 = 0; t0 < d; t0 += GRAM_CHUNK) {
        const int64_t len = d - t0 < GRAM_CHUNK ? d - t0 : GRAM_CHUNK;
        for (int64_t q = 0; q < Cp; q++) {
            double *slot = buf + q * GRAM_CHUNK;
            if (q >= C) {
                rows[q] = slot; /* zero row */
            } else if (a32) {
                widen(a32 + q * d + t0, slot, len);
                rows[q] = slot;
            } else {
                rows[q] = a64 + q * d + t0;
            }
        }
        for (int64_t i0 = 0; i0 < C; i0 += 4)
            for (int64_t j0 = i0; j0 < C; j0 += 4) {
                gram_4x4(rows + i0, rows + j0, len, tile);
                for (int p = 0; p < 4 && i0 + p < C; p++)
                    for (int q = 0; q < 4 && j0 + q < C; q++)
                        if (i0 + p <= j0 + q) g[(j0 + q) * C + i0 + p] += tile[4 * p + q];
            }
    }
}

/* Factors token n; 1 when it took the QR route, 0 for Cholesky, < 0 a status. */
static int factor_token(const factor_ctx *c, factor_scratch *s, int64_t n) {
    const int64_t C = c->C, d = c->d, k = c->k, P = MOEI2_PACKED_SIZE(C);
    /* The token's [C, d] row-major block is the d x C column-major matrix whose columns are the
     * candidate outputs. */
    const float *src32 = c->f32 ? c->f32 + n * C * d : NULL;
    const double *src64 = c->f64 ? c->f64 + n * C * d : NULL;
    double *r = c->factor + n * P;
    int qr = 1;
    if (d >= C) {
        gram_upper(src32, src64, C, d, s->buf, s->rows, s->g);
        /* A NaN or Inf anywhere in row i makes G_ii = sum of its squares non-finite (so does
         * an overflow of the squares, which the QR route would meet too). */
        for (int64_t i = 0; i < C; i++)
            if (!isfinite(s->g[i * C + i])) return -(int)MOEI2_ERR_NONFINITE;
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
        if (!s->work) {
            double query = 0.0;
            if (!s->a && !(s->a = moei2_alloc(s->dc, sizeof(double)))) return -(int)MOEI2_ERR_NOMEM;
            lapack_int info = BLASFN(LAPACKE_dgeqrf_work)(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)C, s->a,
                                                          (lapack_int)d, s->tau, &query, -1);
            if (info != 0) return -(int)MOEI2_ERR_LAPACK;
            s->lwork = (lapack_int)query < (lapack_int)C ? (lapack_int)C : (lapack_int)query;
            if (!(s->work = moei2_alloc(s->lwork, sizeof(double)))) return -(int)MOEI2_ERR_NOMEM;
        }
        int finite = 1;
        if (src32) {
            for (int64_t i = 0; i < C * d; i++) {
                s->a[i] = (double)src32[i];
                finite &= isfinite(src32[i]) != 0;
            }
        } else {
            memcpy(s->a, src64, (size_t)(C * d) * sizeof(double));
            for (int64_t i = 0; i < C * d; i++) finite &= isfinite(src64[i]) != 0;
        }
        if (!finite) return -(int)MOEI2_ERR_NONFINITE;
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
        /* Panels of equal size (at most EXPERT_PANEL rows): a short last panel would pay for
         * packing the expert's weights for a handful of rows. */
        const int64_t total = c->bounds[e + 1] - c->bounds[e];
        const int64_t panels = (total + EXPERT_PANEL - 1) / EXPERT_PANEL;
        const int64_t size = panels ? (total + panels - 1) / panels : 0;
        for (int64_t p0 = c->bounds[e]; p0 < c->bounds[e + 1]; p0 += size) {
            const int64_t rows = c->bounds[e + 1] - p0 < size ? c->bounds[e + 1] - p0 : size;
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
