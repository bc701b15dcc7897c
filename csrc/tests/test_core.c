/* The shared thread launcher, BLAS pinning, checked allocation and its use by the search (huge
 * populations must fail cleanly), the factor step's two routes and the candidate-output kernel. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "moei2_core.h"
#include "moei2_internal.h"

static double gaussian(moei2_rng *rng) {
    double u = moei2_rng_uniform(rng) + 1e-300, v = moei2_rng_uniform(rng);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* ---- allocation and overflow ----------------------------------------------------------- */

static void test_checked_sizes(void) {
    int64_t out = 0;
    CHECK(moei2_mul_ok(3, 5, &out) == 0 && out == 15);
    CHECK(moei2_mul_ok(INT64_MAX / 2 + 1, 2, &out) != 0);
    CHECK(moei2_mul_ok((int64_t)1 << 61, 8, &out) != 0);
    CHECK(moei2_mul_ok(-1, 2, &out) != 0);
    CHECK(moei2_alloc(INT64_MAX, 8) == NULL);
    CHECK(moei2_alloc((int64_t)1 << 61, 8) == NULL);
    CHECK(moei2_alloc(-1, 8) == NULL);
    CHECK(moei2_calloc((int64_t)1 << 62, 4) == NULL);
    void *p = moei2_alloc(0, 8); /* a valid pointer, so NULL always means failure */
    CHECK(p != NULL);
    free(p);
}

/* ---- par_for ------------------------------------------------------------------------------- */

typedef struct {
    int64_t *out;
    int64_t fail_at;
    atomic_int calls;
} par_ctx;

static int fill_block(void *arg, int64_t begin, int64_t end) {
    par_ctx *c = (par_ctx *)arg;
    atomic_fetch_add(&c->calls, 1);
    for (int64_t i = begin; i < end; i++) {
        if (i == c->fail_at) return MOEI2_ERR_LAPACK;
        c->out[i] = i * i;
    }
    return 0;
}

static void test_par_for(void) {
    enum { N = 1000 };
    int64_t out[N];
    for (int threads = 1; threads <= 5; threads += 2) {
        memset(out, 0, sizeof out);
        par_ctx c = {.out = out, .fail_at = -1};
        atomic_init(&c.calls, 0);
        CHECK(moei2_par_for(threads, N, 7, fill_block, &c) == 0);
        int ok = 1;
        for (int64_t i = 0; i < N; i++) ok &= out[i] == i * i;
        CHECK(ok);
        CHECK(atomic_load(&c.calls) == (N + 6) / 7);
    }
    par_ctx c = {.out = out, .fail_at = 500};
    atomic_init(&c.calls, 0);
    CHECK(moei2_par_for(3, N, 10, fill_block, &c) == MOEI2_ERR_LAPACK);
    CHECK(moei2_par_for(3, 0, 10, fill_block, &c) == 0);
    c.fail_at = -1;
    CHECK(moei2_par_for(0, 5, 0, fill_block, &c) == 0); /* degenerate counts clamp to 1 */
}

static void test_blas_pin(void) {
    int before = moei2_blas_get_num_threads();
    moei2_blas_set_num_threads(2);
    moei2_blas_pin_single();
    CHECK(moei2_blas_get_num_threads() == 1);
    moei2_blas_pin_single(); /* an overlapping caller saves nothing */
    moei2_blas_unpin();
    CHECK(moei2_blas_get_num_threads() == 1);
    moei2_blas_unpin();
    CHECK(moei2_blas_get_num_threads() == 2);
    moei2_blas_unpin(); /* unbalanced: ignored */
    CHECK(moei2_blas_get_num_threads() == 2);
    moei2_blas_set_num_threads(before);
}

/* ---- factor --------------------------------------------------------------------------------- */

/* max |R^T R - O O^T| / max |O O^T| for token n of outputs [N, C, d]. */
static double gram_error(const double *o, const double *factor, int64_t n, int64_t C, int64_t d) {
    const double *r = factor + n * MOEI2_PACKED_SIZE(C);
    double err = 0.0, scale = 0.0;
    for (int64_t i = 0; i < C; i++)
        for (int64_t j = 0; j < C; j++) {
            double want = 0.0, got = 0.0;
            for (int64_t t = 0; t < d; t++) want += o[(n * C + i) * d + t] * o[(n * C + j) * d + t];
            for (int64_t q = 0; q <= (i < j ? i : j); q++)
                got += r[MOEI2_PACKED_SIZE(i) + q] * r[MOEI2_PACKED_SIZE(j) + q];
            err = fmax(err, fabs(got - want));
            scale = fmax(scale, fabs(want));
        }
    return err / scale;
}

/* One factor-step case: the same gaussian outputs [N, C, d] in float64 and float32 (so the two
 * input paths can be compared bitwise), a constant candidate probability, and room for two sets
 * of factors and norms. */
typedef struct {
    int64_t N, C, d, P;
    double *o, *cp, *f1, *f2, *n1, *n2;
    float *o32;
} factor_case;

static void factor_case_free(factor_case *fc) {
    free(fc->o); free(fc->o32); free(fc->cp); free(fc->f1); free(fc->f2); free(fc->n1); free(fc->n2);
}

static int factor_case_init(factor_case *fc, int64_t N, int64_t C, int64_t d, uint64_t seed, double prob) {
    *fc = (factor_case){.N = N, .C = C, .d = d, .P = MOEI2_PACKED_SIZE(C)};
    fc->o = malloc((size_t)(N * C * d) * sizeof(double));
    fc->o32 = malloc((size_t)(N * C * d) * sizeof(float));
    fc->cp = malloc((size_t)(N * C) * sizeof(double));
    fc->f1 = malloc((size_t)(N * fc->P) * sizeof(double));
    fc->f2 = malloc((size_t)(N * fc->P) * sizeof(double));
    fc->n1 = malloc((size_t)N * sizeof(double));
    fc->n2 = malloc((size_t)N * sizeof(double));
    if (!fc->o || !fc->o32 || !fc->cp || !fc->f1 || !fc->f2 || !fc->n1 || !fc->n2) {
        factor_case_free(fc);
        *fc = (factor_case){0}; /* callers test fc->o: no dangling pointer may stay behind */
        return 0;
    }
    moei2_rng rng;
    moei2_rng_seed(&rng, seed);
    for (int64_t i = 0; i < N * C * d; i++) fc->o32[i] = (float)gaussian(&rng);
    for (int64_t i = 0; i < N * C * d; i++) fc->o[i] = fc->o32[i];
    for (int64_t i = 0; i < N * C; i++) fc->cp[i] = prob;
    return 1;
}

/* The two input paths of moei2_search_factor give bitwise the same factors and norms. */
static int factor_case_same(const factor_case *fc) {
    return memcmp(fc->f1, fc->f2, (size_t)(fc->N * fc->P) * sizeof(double)) == 0 &&
           memcmp(fc->n1, fc->n2, (size_t)fc->N * sizeof(double)) == 0;
}

static void test_factor_routes(void) {
    factor_case fc;
    CHECK(factor_case_init(&fc, 40, 6, 37, 5, 0.1));
    if (!fc.o) return;
    const int64_t N = fc.N, C = fc.C, d = fc.d, k = 2;
    double *o = fc.o, *cp = fc.cp, *f1 = fc.f1, *n1 = fc.n1;
    /* tokens 0..9: two candidates with the same output, a singular Gram -> QR */
    for (int64_t n = 0; n < 10; n++) memcpy(o + (n * C + 3) * d, o + (n * C + 1) * d, (size_t)d * sizeof(double));
    for (int64_t n = 0; n < 10; n++)
        memcpy(fc.o32 + (n * C + 3) * d, fc.o32 + (n * C + 1) * d, (size_t)d * sizeof(float));
    int64_t qr = -1;
    CHECK(moei2_search_factor(N, C, d, NULL, o, k, 0, 1.0, cp, f1, n1, 1, &qr) == MOEI2_OK);
    CHECK(qr == 10);
    double worst = 0.0;
    for (int64_t n = 0; n < N; n++) worst = fmax(worst, gram_error(o, f1, n, C, d));
    CHECK(worst < 1e-13);
    /* same values in float32: bitwise the same factors, at any thread count */
    CHECK(moei2_search_factor(N, C, d, fc.o32, NULL, k, 0, 1.0, cp, fc.f2, fc.n2, 3, &qr) == MOEI2_OK);
    CHECK(factor_case_same(&fc));
    /* d < C: only QR */
    CHECK(moei2_search_factor(N, C, 4, NULL, o, k, 1, 1.0, cp, f1, n1, 2, &qr) == MOEI2_OK && qr == N);
    /* non-finite input on either route */
    o[(7 * C + 2) * d + 5] = NAN;
    CHECK(moei2_search_factor(N, C, d, NULL, o, k, 0, 1.0, cp, f1, n1, 2, NULL) == MOEI2_ERR_NONFINITE);
    o[(20 * C + 2) * d + 5] = INFINITY;
    CHECK(moei2_search_factor(N - 20, C, d, NULL, o + 20 * C * d, k, 0, 1.0, cp, f1, n1, 2, NULL) ==
          MOEI2_ERR_NONFINITE);
    CHECK(moei2_search_factor(N, C, (int64_t)1 << 40, NULL, o, k, 0, 1.0, cp, f1, n1, 2, NULL) == MOEI2_ERR_ARG);
    factor_case_free(&fc);
}

/* The Gram kernel at the search's width (C = 19: a partial last row of tiles) over several
 * column passes and a partial last vector: float32 and float64 input give bitwise the same
 * factors at any thread count, and R^T R matches O O^T. */
static void test_factor_gram_widths(void) {
    factor_case fc;
    CHECK(factor_case_init(&fc, 37, 19, 301, 11, 0.05));
    if (!fc.o) return;
    const int64_t N = fc.N, C = fc.C, d = fc.d, k = 4;
    int64_t qr = -1;
    CHECK(moei2_search_factor(N, C, d, NULL, fc.o, k, 0, 1.0, fc.cp, fc.f1, fc.n1, 1, &qr) == MOEI2_OK && qr == 0);
    double worst = 0.0;
    for (int64_t n = 0; n < N; n++) worst = fmax(worst, gram_error(fc.o, fc.f1, n, C, d));
    CHECK(worst < 1e-13);
    for (int threads = 1; threads <= 3; threads++) {
        CHECK(moei2_search_factor(N, C, d, fc.o32, NULL, k, 0, 1.0, fc.cp, fc.f2, fc.n2, threads, &qr) == MOEI2_OK &&
              qr == 0);
        CHECK(factor_case_same(&fc));
    }
    factor_case_free(&fc);
}

/* The route threshold: candidate outputs along distinct axes with norms 1 and s give a diagonal
 * Gram with cond1 = 1 / s^2 exactly, and the bound on it is exact too: s = 2^-8 (cond 65536) keeps
 * the Cholesky, s = 2^-9 (cond 262144 > 1 / GRAM_MIN_RCOND = 1e5) takes QR. */
static void test_factor_route_threshold(void) {
    const int64_t N = 2, C = 6, d = 16, k = 2, P = MOEI2_PACKED_SIZE(C);
    double *o = calloc((size_t)(N * C * d), sizeof(double));
    double cp[12], f[2 * MOEI2_PACKED_SIZE(6)], n2[2];
    for (int64_t i = 0; i < N * C; i++) cp[i] = 0.1;
    for (int64_t n = 0; n < N; n++)
        for (int64_t q = 0; q < C; q++) o[(n * C + q) * d + q] = q == C - 1 ? ldexp(1.0, n == 0 ? -8 : -9) : 1.0;
    int64_t qr = -1;
    CHECK(moei2_search_factor(1, C, d, NULL, o, k, 0, 1.0, cp, f, n2, 1, &qr) == MOEI2_OK && qr == 0);
    CHECK(moei2_search_factor(1, C, d, NULL, o + C * d, k, 0, 1.0, cp, f + P, n2 + 1, 1, &qr) == MOEI2_OK &&
          qr == 1);
    for (int64_t n = 0; n < N; n++) CHECK(gram_error(o, f, n, C, d) < 1e-15);
    free(o);
}

/* The largest relative error of out (the job's candidate outputs) against the direct formula in
 * double precision: silu(gate x) * (up x), then down; at most 8 intermediate features. */
static double candidate_outputs_error(const moei2_expert_outputs_job *job, const float *out) {
    const int64_t n = job->num_tokens, C = job->num_candidates, H = job->hidden, F = job->inter;
    const float *x = job->x, *gu = job->gate_up, *dn = job->down;
    double worst = 0.0;
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < C; q++) {
            const int64_t e = job->candidates[t * C + q];
            double a[8];
            for (int64_t f = 0; f < F && f < 8; f++) {
                double g = 0.0, u = 0.0;
                for (int64_t h = 0; h < H; h++) {
                    g += (double)gu[(e * 2 * F + f) * H + h] * x[t * H + h];
                    u += (double)gu[(e * 2 * F + F + f) * H + h] * x[t * H + h];
                }
                a[f] = g / (1.0 + exp(-g)) * u;
            }
            for (int64_t h = 0; h < H; h++) {
                double y = 0.0;
                for (int64_t f = 0; f < F && f < 8; f++) y += (double)dn[(e * H + h) * F + f] * a[f];
                worst = fmax(worst, fabs(y - out[(t * C + q) * H + h]) / (1.0 + fabs(y)));
            }
        }
    return F <= 8 ? worst : INFINITY;
}

/* ---- candidate outputs ------------------------------------------------------------------------ */

static void test_candidate_outputs(void) {
    const int64_t n = 23, C = 3, E = 5, H = 9, F = 6;
    moei2_rng rng;
    moei2_rng_seed(&rng, 9);
    float *x = malloc((size_t)(n * H) * sizeof(float)), *gu = malloc((size_t)(E * 2 * F * H) * sizeof(float));
    float *dn = malloc((size_t)(E * H * F) * sizeof(float));
    float *out1 = malloc((size_t)(n * C * H) * sizeof(float)), *out2 = malloc((size_t)(n * C * H) * sizeof(float));
    int32_t cand[23 * 3];
    for (int64_t i = 0; i < n * H; i++) x[i] = (float)gaussian(&rng);
    for (int64_t i = 0; i < E * 2 * F * H; i++) gu[i] = (float)(0.3 * gaussian(&rng));
    for (int64_t i = 0; i < E * H * F; i++) dn[i] = (float)(0.3 * gaussian(&rng));
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < C; q++) cand[t * C + q] = (int32_t)((t + 2 * q) % E);
    moei2_expert_outputs_job job = {n, C, E, H, F, x, cand, gu, dn, out1};
    CHECK(moei2_candidate_outputs(&job, 1) == MOEI2_OK);
    job.outputs = out2;
    CHECK(moei2_candidate_outputs(&job, 4) == MOEI2_OK);
    CHECK(memcmp(out1, out2, (size_t)(n * C * H) * sizeof(float)) == 0);
    CHECK(candidate_outputs_error(&job, out1) < 1e-5);
    cand[4] = (int32_t)E; /* an expert id out of range */
    CHECK(moei2_candidate_outputs(&job, 2) == MOEI2_ERR_ARG);
    free(x); free(gu); free(dn); free(out1); free(out2);
}

/* An expert with more rows than a panel (1024) takes panels of equal size; the outputs match
 * the direct formula and do not depend on the thread count. */
static void test_candidate_outputs_panels(void) {
    const int64_t n = 2500, C = 2, E = 3, H = 3, F = 2;
    moei2_rng rng;
    moei2_rng_seed(&rng, 13);
    float *x = malloc((size_t)(n * H) * sizeof(float)), gu[3 * 2 * 2 * 3], dn[3 * 3 * 2];
    float *out1 = malloc((size_t)(n * C * H) * sizeof(float)), *out2 = malloc((size_t)(n * C * H) * sizeof(float));
    int32_t *cand = malloc((size_t)(n * C) * sizeof(int32_t));
    for (int64_t i = 0; i < n * H; i++) x[i] = (float)gaussian(&rng);
    for (int64_t i = 0; i < E * 2 * F * H; i++) gu[i] = (float)(0.5 * gaussian(&rng));
    for (int64_t i = 0; i < E * H * F; i++) dn[i] = (float)(0.5 * gaussian(&rng));
    for (int64_t t = 0; t < n; t++) { /* expert 0 on every token: 2500 rows, three panels */
        cand[t * C] = 0;
        cand[t * C + 1] = (int32_t)(1 + t % 2);
    }
    moei2_expert_outputs_job job = {n, C, E, H, F, x, cand, gu, dn, out1};
    CHECK(moei2_candidate_outputs(&job, 1) == MOEI2_OK);
    job.outputs = out2;
    CHECK(moei2_candidate_outputs(&job, 3) == MOEI2_OK);
    CHECK(memcmp(out1, out2, (size_t)(n * C * H) * sizeof(float)) == 0);
    CHECK(candidate_outputs_error(&job, out1) < 1e-5);
    free(x); free(out1); free(out2); free(cand);
}

/* SiLU against double precision over its whole range: one token x = e_0, gate weights g_f and
 * up weights 1 in column 0, down = identity, so the kernel's output f is silu(g_f) exactly as
 * its SiLU computes it (the products are by 1 and 0). A NaN gate gives a NaN output. */
static void test_candidate_outputs_silu(void) {
    enum { F = 411 };
    float *x = calloc(F, sizeof(float)), *gu = calloc(2 * F * F, sizeof(float)), *dn = calloc(F * F, sizeof(float));
    float *out = malloc(F * sizeof(float));
    double want[F];
    x[0] = 1.0f;
    for (int f = 0; f < F; f++) {
        float g = f < 400 ? -100.0f + 0.5f * (float)f : (float[]){0.0f, -0.0f, 1e-30f, -1e-30f, 86.9f, 87.1f, 88.1f,
                                                                 -87.1f, -88.1f, -150.0f, 1000.0f}[f - 400];
        if (f % 7 == 3 && f < 400) g += 0.123456f;
        gu[(int64_t)f * F] = g;
        gu[(int64_t)(F + f) * F] = 1.0f;
        dn[(int64_t)f * F + f] = 1.0f;
        want[f] = (double)g / (1.0 + exp(-(double)g));
    }
    int32_t cand = 0;
    moei2_expert_outputs_job job = {1, 1, 1, F, F, x, &cand, gu, dn, out};
    CHECK(moei2_candidate_outputs(&job, 1) == MOEI2_OK);
    double worst = 0.0, worst_tiny = 0.0;
    for (int f = 0; f < F; f++) {
        if (fabs(want[f]) > 1e-30) worst = fmax(worst, fabs(out[f] - want[f]) / fabs(want[f]));
        else worst_tiny = fmax(worst_tiny, fabs(out[f] - want[f]));
    }
    CHECK(worst < 4e-7);      /* a few float ulps */
    CHECK(worst_tiny < 1e-35);
    gu[0] = NAN;
    CHECK(moei2_candidate_outputs(&job, 1) == MOEI2_OK && isnan(out[0]));
    free(x); free(gu); free(dn); free(out);
}

/* ---- huge search sizes fail cleanly ------------------------------------------------------------ */

static void test_genetic_huge_population(void) {
    const int64_t N = 16, E = 128, k = 8, C = 40, d = 4, W = MOEI2_MASK_WORDS(E);
    moei2_rng rng;
    moei2_rng_seed(&rng, 3);
    double *logits = malloc((size_t)(N * E) * sizeof(double)), *cp = malloc((size_t)(N * C) * sizeof(double));
    double *probs = malloc((size_t)(N * E) * sizeof(double)), *out = malloc((size_t)(N * C * d) * sizeof(double));
    double *factor = malloc((size_t)(N * MOEI2_PACKED_SIZE(C)) * sizeof(double)), *norm2 = malloc(N * sizeof(double));
    int32_t *cand = malloc((size_t)(N * C) * sizeof(int32_t));
    uint64_t *bits = malloc((size_t)(N * W) * sizeof(uint64_t));
    for (int64_t i = 0; i < N * E; i++) logits[i] = gaussian(&rng);
    for (int64_t i = 0; i < N * C * d; i++) out[i] = gaussian(&rng);
    CHECK(moei2_search_prepare(N, E, k, C, logits, cand, cp, probs, bits) == MOEI2_OK);
    CHECK(moei2_search_factor(N, C, d, NULL, out, k, 0, 1.0, cp, factor, norm2, 2, NULL) == MOEI2_OK);
    int64_t ends[1] = {N};
    moei2_search_cache cache = {N, E, k, C, 0, 1.0, 1, ends, cand, cp, probs, bits, factor, norm2,
                               MOEI2_WEIGHTS_SOFTMAX, 0.0, NULL, 1, 1, 0.0};
    uint64_t masks[2 * 2];
    double losses[2], hb[1], hm[1];
    const int64_t populations[] = {(int64_t)1 << 61, INT64_MAX / 2, INT64_MAX};
    for (int i = 0; i < 3; i++) {
        moei2_genetic_params p = {32, populations[i], 1, 1, 0.3, 2, 2};
        moei2_search_result res = {masks, losses, 0, hb, hm, 0, 0};
        CHECK(moei2_search_genetic(&cache, &p, &rng, &res) == MOEI2_ERR_NOMEM);
    }
    free(logits); free(cp); free(probs); free(out); free(factor); free(norm2); free(cand); free(bits);
}

int main(void) {
    test_checked_sizes();
    test_par_for();
    test_blas_pin();
    test_factor_routes();
    test_factor_gram_widths();
    test_factor_route_threshold();
    test_candidate_outputs();
    test_candidate_outputs_panels();
    test_candidate_outputs_silu();
    test_genetic_huge_population();
    return check_report("test_core");
}
