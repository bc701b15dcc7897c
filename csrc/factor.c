/* The search cache's per-token factors, and the candidate expert outputs they are made from.
 *
 * Factor: for each token, R upper triangular with R^T R = O O^T, O the C x d matrix of its
 * candidate outputs. The level-3 route forms the Gram G = O O^T in float64 once per
 * token (a register-tiled kernel: for C ~ 20 the BLAS syrk/gemm entry overheads dominate) and
 * factors it by Cholesky: C(C+1)d flops per token at level-3 rate, against dgeqrf's 2C^2 d at
 * level-2 rate. Forming G squares the conditioning: the error of ||R c|| grows like
 * eps * (|O| |c| / ||O c||)^2 instead of eps * |O| |c| / ||O c|| for a QR of O itself. So each
 * token's Cholesky is accepted only when a lower bound of its reciprocal condition number
 * (from R^-1, see gram_cond_bound) is at least GRAM_MIN_RCOND; otherwise (and when the Cholesky
 * fails: rank-deficient O, d < C) that token is factored by Householder QR of O, as before. The
 * float32 path widens the rows in registers (products of float32 values are exact in float64).
 * Tokens are processed in blocks of fixed size on moei2_par_for's threads with single-threaded BLAS;
 * every token's result depends on its own data only, so the factors are bitwise the same at any
 * thread count.
 *
 * Candidate outputs: per expert, the tokens holding it among their candidates are gathered,
 * h = x W_gu^T (sgemm), a = silu(gate) * up, o = a W_down^T (sgemm), and each row is written into
 * its token's candidate slot. Experts are independent blocks of moei2_par_for, each computed by one
 * thread in row panels of equal size (at most EXPERT_PANEL rows, fixed by the expert's rows), so
 * the result does not depend on the thread count. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_blas.h"
#include "moei2_core.h"
#include "moei2_internal.h"

/* The Cholesky of G is kept when gram_cond_bound, an upper bound of cond1(G), is at most
 * 1 / GRAM_MIN_RCOND: so GRAM_MIN_RCOND is a lower bound of the accepted tokens' reciprocal
 * 1-norm condition numbers (dpocon's estimate, used before, could overstate it). cond(G) =
 * cond(O)^2 <= 1e5 keeps the Gram route's error within about 1e5 eps ~ 2e-11 relative for the
 * worst coefficient vector, under the 1e-10 promised against the float64 oracle. */
#define GRAM_MIN_RCOND 1e-5
/* Columns of the outputs per pass: a token's C row slices of this length (C x 512 bytes in
 * float32) stay in L1 while the tiles of the pass read them, up to C / 4 + 1 times each. The
 * tiles keep their lane sums across passes, so a short pass costs no extra reduction. */
enum { GRAM_CHUNK = 128 };
enum { GRAM_LANES = 8 };

/* Tokens per par_for block: enough work per block (~1 ms) to hide the hand-out. */
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
    double *buf;   /* [ceil(C/4)*4, GRAM_CHUNK] a pass's widened or zero-padded row slices */
    const void **rows; /* [ceil(C/4)*4] */
    float *zeros32;      /* [GRAM_CHUNK] the padding rows of a float32 pass */
    const char **pf;     /* [C] the next token's row slices of a pass */
    double *acc;   /* [tiles, 16, GRAM_LANES] the lane sums of the Gram tiles of one token */
    double *g;     /* [C, C] */
    double *rinv;  /* [C, C] */
    double *tau, *work, *w;
    lapack_int lwork;
} factor_scratch;

static void factor_scratch_free(factor_scratch *s) {
    free(s->a); free(s->buf); free(s->rows); free(s->zeros32); free(s->pf); free(s->acc); free(s->g);
    free(s->rinv); free(s->tau); free(s->work); free(s->w);
}

static moei2_status factor_scratch_alloc(factor_scratch *s, int64_t C, int64_t d, int64_t k) {
    memset(s, 0, sizeof *s);
    int64_t dc, cc;
    if (moei2_mul_ok(d, C, &dc) || moei2_mul_ok(C, C, &cc)) return MOEI2_ERR_NOMEM;
    const int64_t nb = (C + 3) / 4;
    s->buf = moei2_calloc(nb * 4 * GRAM_CHUNK, sizeof(double));
    s->rows = moei2_alloc(nb * 4, sizeof(void *));
    s->zeros32 = moei2_calloc(GRAM_CHUNK, sizeof(float));
    s->pf = moei2_alloc(C, sizeof(char *));
    s->acc = moei2_alloc(nb * (nb + 1) / 2 * 16 * GRAM_LANES, sizeof(double));
    s->g = moei2_alloc(cc, sizeof(double));
    s->rinv = moei2_alloc(cc, sizeof(double));
    s->tau = moei2_alloc(C, sizeof(double));
    s->w = moei2_alloc(k, sizeof(double));
    if (!s->buf || !s->rows || !s->zeros32 || !s->pf || !s->acc || !s->g || !s->rinv || !s->tau || !s->w) goto fail;
    s->dc = dc;
    return MOEI2_OK;
fail:
    factor_scratch_free(s);
    return MOEI2_ERR_NOMEM;
}

/* The Gram tiles. A tile holds, for four rows a and four rows b, GRAM_LANES lanes per product
 * <a_i, b_j>: lane l sums the columns t = l mod GRAM_LANES, and the lanes are added in a fixed
 * order once per token, so the sums depend on the code path the CPU selects only through FMA
 * rounding. The products of float32 values are exact in float64, and float32 rows are widened
 * in registers on their way into the same tiles, so both inputs give bitwise the same sums for
 * the same values; no widened copy goes through memory (a separate widening pass cost nearly as
 * much as the tiles while the outputs came from DRAM, and still a fifth with them in cache). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define GRAM_CLONES \
    __attribute__((target_clones("avx512f", "arch=haswell", "default"), optimize("fp-contract=fast")))
#else
#define GRAM_CLONES
#endif
/* Named vector accumulators (GCC vector extensions) stay in registers; an array of accumulators
 * indexed in a loop was kept in memory, a load and a store per FMA. */
typedef double gram_vec __attribute__((vector_size(GRAM_LANES * sizeof(double))));
#define GRAM_LD(v, p) memcpy(&(v), (p), sizeof(gram_vec))
#define GRAM_ST(p, v) memcpy((p), &(v), sizeof(gram_vec))
/* Lanes t .. t + GRAM_LANES - 1 of a row, float32 (f32) or float64. The float32 row is widened
 * through an array: GCC 12 compiles that to one vcvtps2pd per vector, where its
 * __builtin_convertvector of eight floats splits into halves and a merge. */
#define GRAM_LOADX(v, row, f32, t)                                                           \
    do {                                                                                     \
        if (f32) {                                                                           \
            double wide_[GRAM_LANES];                                                        \
            for (int l_ = 0; l_ < GRAM_LANES; l_++) wide_[l_] = ((const float *)(row))[(t) + l_]; \
            memcpy(&(v), wide_, sizeof(gram_vec));                                           \
        } else {                                                                             \
            memcpy(&(v), (const double *)(row) + (t), sizeof(gram_vec));                     \
        }                                                                                    \
    } while (0)

/* acc[16 x GRAM_LANES] += the lanes of the 4 x 4 products of rows a and b over len columns, a
 * multiple of GRAM_LANES. */
static inline __attribute__((always_inline)) void gram_tile(const void *const *a, const void *const *b, int f32,
                                                             int64_t len, double *restrict acc) {
    gram_vec c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15;
    GRAM_LD(c0, acc + 0 * GRAM_LANES); GRAM_LD(c1, acc + 1 * GRAM_LANES); GRAM_LD(c2, acc + 2 * GRAM_LANES);
    GRAM_LD(c3, acc + 3 * GRAM_LANES); GRAM_LD(c4, acc + 4 * GRAM_LANES); GRAM_LD(c5, acc + 5 * GRAM_LANES);
    GRAM_LD(c6, acc + 6 * GRAM_LANES); GRAM_LD(c7, acc + 7 * GRAM_LANES); GRAM_LD(c8, acc + 8 * GRAM_LANES);
    GRAM_LD(c9, acc + 9 * GRAM_LANES); GRAM_LD(c10, acc + 10 * GRAM_LANES); GRAM_LD(c11, acc + 11 * GRAM_LANES);
    GRAM_LD(c12, acc + 12 * GRAM_LANES); GRAM_LD(c13, acc + 13 * GRAM_LANES); GRAM_LD(c14, acc + 14 * GRAM_LANES);
    GRAM_LD(c15, acc + 15 * GRAM_LANES);
    const void *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    for (int64_t t = 0; t < len; t += GRAM_LANES) {
        gram_vec x0, x1, x2, x3, y0, y1, y2, y3;
        GRAM_LOADX(x0, a0, f32, t); GRAM_LOADX(x1, a1, f32, t); GRAM_LOADX(x2, a2, f32, t); GRAM_LOADX(x3, a3, f32, t);
        GRAM_LOADX(y0, b0, f32, t); GRAM_LOADX(y1, b1, f32, t); GRAM_LOADX(y2, b2, f32, t); GRAM_LOADX(y3, b3, f32, t);
        c0 += x0 * y0; c1 += x0 * y1; c2 += x0 * y2; c3 += x0 * y3;
        c4 += x1 * y0; c5 += x1 * y1; c6 += x1 * y2; c7 += x1 * y3;
        c8 += x2 * y0; c9 += x2 * y1; c10 += x2 * y2; c11 += x2 * y3;
        c12 += x3 * y0; c13 += x3 * y1; c14 += x3 * y2; c15 += x3 * y3;
    }
    GRAM_ST(acc + 0 * GRAM_LANES, c0); GRAM_ST(acc + 1 * GRAM_LANES, c1); GRAM_ST(acc + 2 * GRAM_LANES, c2);
    GRAM_ST(acc + 3 * GRAM_LANES, c3); GRAM_ST(acc + 4 * GRAM_LANES, c4); GRAM_ST(acc + 5 * GRAM_LANES, c5);
    GRAM_ST(acc + 6 * GRAM_LANES, c6); GRAM_ST(acc + 7 * GRAM_LANES, c7); GRAM_ST(acc + 8 * GRAM_LANES, c8);
    GRAM_ST(acc + 9 * GRAM_LANES, c9); GRAM_ST(acc + 10 * GRAM_LANES, c10); GRAM_ST(acc + 11 * GRAM_LANES, c11);
    GRAM_ST(acc + 12 * GRAM_LANES, c12); GRAM_ST(acc + 13 * GRAM_LANES, c13); GRAM_ST(acc + 14 * GRAM_LANES, c14);
    GRAM_ST(acc + 15 * GRAM_LANES, c15);
}

/* A diagonal tile (b = a): the ten products of its upper triangle, in the slots 4 i + j (i <= j)
 * of a 4 x 4 tile; the other six would only repeat them. */
static inline __attribute__((always_inline)) void gram_diag(const void *const *a, int f32, int64_t len,
                                                             double *restrict acc) {
    gram_vec c0, c1, c2, c3, c5, c6, c7, c10, c11, c15;
    GRAM_LD(c0, acc + 0 * GRAM_LANES); GRAM_LD(c1, acc + 1 * GRAM_LANES); GRAM_LD(c2, acc + 2 * GRAM_LANES);
    GRAM_LD(c3, acc + 3 * GRAM_LANES); GRAM_LD(c5, acc + 5 * GRAM_LANES); GRAM_LD(c6, acc + 6 * GRAM_LANES);
    GRAM_LD(c7, acc + 7 * GRAM_LANES); GRAM_LD(c10, acc + 10 * GRAM_LANES); GRAM_LD(c11, acc + 11 * GRAM_LANES);
    GRAM_LD(c15, acc + 15 * GRAM_LANES);
    const void *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    for (int64_t t = 0; t < len; t += GRAM_LANES) {
        gram_vec x0, x1, x2, x3;
        GRAM_LOADX(x0, a0, f32, t); GRAM_LOADX(x1, a1, f32, t); GRAM_LOADX(x2, a2, f32, t); GRAM_LOADX(x3, a3, f32, t);
        c0 += x0 * x0; c1 += x0 * x1; c2 += x0 * x2; c3 += x0 * x3;
        c5 += x1 * x1; c6 += x1 * x2; c7 += x1 * x3;
        c10 += x2 * x2; c11 += x2 * x3;
        c15 += x3 * x3;
    }
    GRAM_ST(acc + 0 * GRAM_LANES, c0); GRAM_ST(acc + 1 * GRAM_LANES, c1); GRAM_ST(acc + 2 * GRAM_LANES, c2);
    GRAM_ST(acc + 3 * GRAM_LANES, c3); GRAM_ST(acc + 5 * GRAM_LANES, c5); GRAM_ST(acc + 6 * GRAM_LANES, c6);
    GRAM_ST(acc + 7 * GRAM_LANES, c7); GRAM_ST(acc + 10 * GRAM_LANES, c10); GRAM_ST(acc + 11 * GRAM_LANES, c11);
    GRAM_ST(acc + 15 * GRAM_LANES, c15);
}

/* One pass: every tile of the upper triangle over the rows' next len columns. Meanwhile the
 * next token's matching row slices (pf[0..C-1], pf_bytes each, or pf NULL) are fetched into L2,
 * spread over the tiles: all at once they filled the miss buffers and stalled the pass. */
static inline __attribute__((always_inline)) void gram_pass(const void *const *rows, int f32, int64_t nb, int64_t len,
                                                             double *restrict acc, const char *const *pf, int64_t C,
                                                             int64_t pf_bytes) {
    const int64_t tiles = nb * (nb + 1) / 2;
    int64_t tile = 0, q = 0;
    for (int64_t ib = 0; ib < nb; ib++)
        for (int64_t jb = ib; jb < nb; jb++, acc += 16 * GRAM_LANES) {
            if (pf)
                for (tile++; q * tiles < tile * C; q++)
                    for (int64_t off = 0; off < pf_bytes; off += 64) __builtin_prefetch(pf[q] + off, 0, 2);
            if (jb == ib) gram_diag(rows + 4 * ib, f32, len, acc);
            else gram_tile(rows + 4 * ib, rows + 4 * jb, f32, len, acc);
        }
}

GRAM_CLONES
static void gram_pass_f32(const void *const *rows, int64_t nb, int64_t len, double *restrict acc,
                          const char *const *pf, int64_t C, int64_t pf_bytes) {
    gram_pass(rows, 1, nb, len, acc, pf, C, pf_bytes);
}

GRAM_CLONES
static void gram_pass_f64(const void *const *rows, int64_t nb, int64_t len, double *restrict acc,
                          const char *const *pf, int64_t C, int64_t pf_bytes) {
    gram_pass(rows, 0, nb, len, acc, pf, C, pf_bytes);
}

/* Widens float32 to float64 with the same vector width as the tiles, for a pass whose length is
 * not a multiple of GRAM_LANES (the last of a token, when d is not): the baseline x86-64 build
 * converts two values per instruction. */
GRAM_CLONES
static void widen(const float *restrict src, double *restrict dst, int64_t n) {
    for (int64_t t = 0; t < n; t++) dst[t] = (double)src[t];
}

/* The upper triangle of G = A A^T (A: the token's C rows of length d, float32 when a32, else
 * float64) into g (C x C column-major), in passes over GRAM_CHUNK columns. next: the next token's
 * rows (or NULL), fetched towards the core during the passes: the outputs stream from DRAM, and
 * the tiles of one token give the time to bring in the next, which the hardware prefetchers did
 * not do for C row slices at a stride of d. */
static void gram_upper(const float *a32, const double *a64, const void *next, int64_t C, int64_t d,
                       factor_scratch *s, double *g) {
    const int64_t nb = (C + 3) / 4, esize = a32 ? (int64_t)sizeof(float) : (int64_t)sizeof(double);
    memset(s->acc, 0, (size_t)(nb * (nb + 1) / 2 * 16 * GRAM_LANES) * sizeof(double));
    for (int64_t t0 = 0; t0 < d; t0 += GRAM_CHUNK) {
        const int64_t len = d - t0 < GRAM_CHUNK ? d - t0 : GRAM_CHUNK;
        const int64_t padded = (len + GRAM_LANES - 1) / GRAM_LANES * GRAM_LANES;
        if (next)
            for (int64_t q = 0; q < C; q++) s->pf[q] = (const char *)next + (q * d + t0) * esize;
        if (a32 && padded == len) {
            for (int64_t q = 0; q < nb * 4; q++) s->rows[q] = q < C ? (const void *)(a32 + q * d + t0) : s->zeros32;
            gram_pass_f32(s->rows, nb, len, s->acc, next ? s->pf : NULL, C, len * esize);
            continue;
        }
        /* Rows past C, and the columns past len up to a multiple of GRAM_LANES, are zeros in
         * buf: a product with zero adds zero exactly. */
        for (int64_t q = 0; q < nb * 4; q++) {
            double *slot = s->buf + q * GRAM_CHUNK;
            if (q < C && a32) {
                widen(a32 + q * d + t0, slot, len);
            } else if (q < C && padded != len) {
                memcpy(slot, a64 + q * d + t0, (size_t)len * sizeof(double));
            } else if (q < C) {
                s->rows[q] = a64 + q * d + t0;
                continue;
            }
            for (int64_t t = q < C ? len : 0; t < padded; t++) slot[t] = 0.0;
            s->rows[q] = slot;
        }
        gram_pass_f64(s->rows, nb, padded, s->acc, next ? s->pf : NULL, C, len * esize);
    }
    const double *acc = s->acc;
    for (int64_t ib = 0; ib < nb; ib++)
        for (int64_t jb = ib; jb < nb; jb++, acc += 16 * GRAM_LANES)
            for (int64_t p = 0; p < 4 && 4 * ib + p < C; p++)
                for (int64_t q = jb == ib ? p : 0; q < 4 && 4 * jb + q < C; q++) {
                    const double *lanes = acc + (4 * p + q) * GRAM_LANES;
                    double sum = 0.0;
                    for (int l = 0; l < GRAM_LANES; l++) sum += lanes[l];
                    g[(4 * jb + q) * C + 4 * ib + p] = sum;
                }
}

/* An upper bound of cond1(G) = ||G||_1 ||G^-1||_1 from G = R^T R (R upper triangular in the
 * upper triangle of r, C x C column-major; anorm = ||G||_1): G^-1 = R^-1 R^-T, so ||G^-1||_1 <=
 * ||R^-1||_1 ||R^-T||_1 = ||R^-1||_1 ||R^-1||_inf. It exceeds cond1(G) by at most a factor
 * C^(3/2), and unlike dpocon's estimate (a lower bound of ||G^-1||_1, which took a dozen LAPACK
 * calls for C ~ 20) it does not understate the conditioning, up to the rounding of R^-1 (relative
 * cond(R) eps, below 1e-13 where a token is accepted). R^-1 (into x) costs C^3 / 6 flops. Returns
 * +Inf or NaN when R^-1 overflows. */
static double gram_cond_bound(const double *r, int64_t C, double anorm, double *x) {
    for (int64_t j = 0; j < C; j++) {
        double *xj = x + j * C;
        xj[j] = 1.0 / r[j * C + j];
        for (int64_t i = j; i-- > 0;) {
            double sum = 0.0;
            for (int64_t q = i + 1; q <= j; q++) sum += r[q * C + i] * xj[q];
            xj[i] = -sum / r[i * C + i];
        }
    }
    double norm1 = 0.0, norminf = 0.0;
    for (int64_t j = 0; j < C; j++) {
        double col = 0.0;
        for (int64_t i = 0; i <= j; i++) col += fabs(x[j * C + i]);
        if (!(col <= norm1)) norm1 = col; /* a NaN sticks */
    }
    for (int64_t i = 0; i < C; i++) {
        double row = 0.0;
        for (int64_t j = i; j < C; j++) row += fabs(x[j * C + i]);
        if (!(row <= norminf)) norminf = row;
    }
    return anorm * norm1 * norminf;
}

/* Factors token n; 1 when it took the QR route, 0 for Cholesky, < 0 a status. */
static int factor_token(const factor_ctx *c, factor_scratch *s, int64_t n, int64_t last) {
    const int64_t C = c->C, d = c->d, k = c->k, P = MOEI2_PACKED_SIZE(C);
    /* The token's [C, d] row-major block is the d x C column-major matrix whose columns are the
     * candidate outputs. */
    const float *src32 = c->f32 ? c->f32 + n * C * d : NULL;
    const double *src64 = c->f64 ? c->f64 + n * C * d : NULL;
    double *r = c->factor + n * P;
    const void *next = NULL;
    if (n + 1 < last)
        next = c->f32 ? (const void *)(c->f32 + (n + 1) * C * d) : (const void *)(c->f64 + (n + 1) * C * d);
    int qr = 1;
    if (d >= C) {
        gram_upper(src32, src64, next, C, d, s, s->g);
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
            if (info == 0 && gram_cond_bound(s->g, C, anorm, s->rinv) <= 1.0 / GRAM_MIN_RCOND) {
                for (int64_t j = 0; j < C; j++)
                    memcpy(r + MOEI2_PACKED_SIZE(j), s->g + j * C, (size_t)(j + 1) * sizeof(double));
                qr = 0;
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
        int got = factor_token(c, &s, n, last);
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

/* Rows of gathered tokens per pair of sgemm calls at most: bounds the scratch (rows x (3I + 2H)
 * floats per thread, sized to the largest expert of the call: at most 34 MiB at Qwen1.5-MoE
 * widths, H = 2048 and I = 1408) while keeping the products large. Each call packs the expert's
 * weights (3 I H floats) again, which cost a fifth of the GEMM time in panels of ~160 rows (at
 * the former 256); an expert's tokens of one chunk of moei2.search (~430 rows at Qwen widths and
 * 256 MiB, more for the busy experts of a trained router) take one panel. */
#define EXPERT_PANEL 1024

/* a = silu(gate) * up = gate / (1 + e^-gate) * up over n values. e^x is Cephes' expf (range
 * reduction by ln 2 in two parts, a degree-6 polynomial, 2^n from its exponent bits; about 1 ulp)
 * written without calls or branches, so the loop vectorises: libm's expf, one call per value,
 * was most of this loop's time. x is clamped to [-87, 88], where 2^n stays normal: for gate
 * > 87 silu is gate to float precision, for gate < -88 it is below 1e-36 in magnitude (libm's
 * overflow to Inf gave -0). A NaN passes through the clamps into the result. */
GRAM_CLONES
static void silu_mul(const float *restrict gate, const float *restrict up, float *restrict a, int64_t n) {
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
    const uint32_t shift_bits = 0x4B400000u;
    for (int64_t j = 0; j < n; j++) {
        float x = -gate[j];
        x = x < -87.0f ? -87.0f : x;
        x = x > 88.0f ? 88.0f : x;
        const float t = x * 1.44269504088896341f + shift;
        const float k = t - shift;
        uint32_t tb;
        memcpy(&tb, &t, sizeof tb);
        float r = x - k * 0.693359375f;
        r = r + k * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * (r * r) + r + 1.0f;
        const uint32_t sb = (tb - shift_bits + 127u) << 23;
        float scale;
        memcpy(&scale, &sb, sizeof scale);
        a[j] = gate[j] / (1.0f + p * scale) * up[j];
    }
}

/* One thread's panel scratch. */
typedef struct {
    float *xg, *h, *act, *out;
} expert_scratch;

typedef struct {
    const moei2_expert_outputs_job *job;
    const int64_t *bounds; /* [E + 1] start of each expert's positions in order */
    const int64_t *order;  /* positions n * C + q grouped by expert, ascending within each */
    int64_t panel;         /* rows per panel at most: EXPERT_PANEL, or fewer when no expert has more */
    /* One scratch per thread, taken by a block for its duration: at most num_threads blocks run
     * at once, so one is always free. Allocated per block, the panels' tens of MiB went back to
     * the system and were faulted in and zeroed again for every expert: a tenth of the kernel's
     * time at Qwen widths. */
    expert_scratch *slots;
    atomic_int *busy;
    int num_slots;
} expert_ctx;

static int expert_block(void *arg, int64_t e0, int64_t e1) {
    const expert_ctx *c = (const expert_ctx *)arg;
    const moei2_expert_outputs_job *job = c->job;
    const int64_t H = job->hidden, F = job->inter, C = job->num_candidates, panel = c->panel;
    int slot = 0;
    while (atomic_exchange(&c->busy[slot], 1)) slot = (slot + 1) % c->num_slots;
    expert_scratch *sc = &c->slots[slot];
    int err = 0;
    if (!sc->xg) {
        sc->xg = moei2_alloc(panel * H, sizeof(float));
        sc->h = moei2_alloc(panel * 2 * F, sizeof(float));
        sc->act = moei2_alloc(panel * F, sizeof(float));
        sc->out = moei2_alloc(panel * H, sizeof(float));
    }
    float *xg = sc->xg, *h = sc->h, *act = sc->act, *out = sc->out;
    if (!xg || !h || !act || !out) { err = MOEI2_ERR_NOMEM; goto done; }
    for (int64_t e = e0; e < e1; e++) {
        const float *gu = job->gate_up + e * 2 * F * H;
        const float *dn = job->down + e * H * F;
        /* Panels of equal size (at most panel rows): a short last panel would pay for packing
         * the expert's weights for a handful of rows. */
        const int64_t total = c->bounds[e + 1] - c->bounds[e];
        const int64_t panels = (total + panel - 1) / panel;
        const int64_t size = panels ? (total + panels - 1) / panels : 0;
        for (int64_t p0 = c->bounds[e]; p0 < c->bounds[e + 1]; p0 += size) {
            const int64_t rows = c->bounds[e + 1] - p0 < size ? c->bounds[e + 1] - p0 : size;
            for (int64_t i = 0; i < rows; i++)
                memcpy(xg + i * H, job->x + (c->order[p0 + i] / C) * H, (size_t)H * sizeof(float));
            /* h [rows, 2I] = xg [rows, H] gu^T, gu [2I, H] row-major */
            BLASFN(cblas_sgemm)(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)rows, (blasint)(2 * F),
                                (blasint)H, 1.0f, xg, (blasint)H, gu, (blasint)H, 0.0f, h, (blasint)(2 * F));
            for (int64_t i = 0; i < rows; i++) silu_mul(h + i * 2 * F, h + i * 2 * F + F, act + i * F, F);
            /* out [rows, H] = act [rows, F] dn^T, dn [H, F] row-major */
            BLASFN(cblas_sgemm)(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)rows, (blasint)H, (blasint)F,
                                1.0f, act, (blasint)F, dn, (blasint)F, 0.0f, out, (blasint)H);
            for (int64_t i = 0; i < rows; i++)
                memcpy(job->outputs + c->order[p0 + i] * H, out + i * H, (size_t)H * sizeof(float));
        }
    }
done:
    atomic_store(&c->busy[slot], 0);
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
        int64_t most = 0;
        for (int64_t e = 0; e < E; e++)
            if (bounds[e + 1] - bounds[e] > most) most = bounds[e + 1] - bounds[e];
        const int num_slots = num_threads < 1 ? 1 : num_threads;
        expert_ctx c = {job, bounds, order, most < EXPERT_PANEL ? most : EXPERT_PANEL, NULL, NULL, num_slots};
        c.slots = moei2_calloc(num_slots, sizeof(expert_scratch));
        c.busy = moei2_alloc(num_slots, sizeof(atomic_int));
        if (!c.slots || !c.busy) {
            status = MOEI2_ERR_NOMEM;
        } else {
            for (int i = 0; i < num_slots; i++) atomic_init(&c.busy[i], 0);
            moei2_blas_pin_single();
            status = (moei2_status)moei2_par_for(num_threads, E, 1, expert_block, &c);
            moei2_blas_unpin();
            for (int i = 0; i < num_slots; i++) {
                free(c.slots[i].xg); free(c.slots[i].h); free(c.slots[i].act); free(c.slots[i].out);
            }
        }
        free(c.slots); free(c.busy);
    }
done:
    free(bounds); free(order); free(fill);
    return status;
}
