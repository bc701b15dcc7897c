/* lowrank.c: decompositions checked against quantities computed here independently (the
 * weighted residual from X, orthonormality, the plain SVD's known spectrum), the fallback chain,
 * thread-count independence, and the rank allocation's budget, caps and order. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "moei2_core.h"

/* Gaussian-ish numbers from the project RNG (sum of uniforms). */
static double noise(moei2_rng *rng) {
    double s = 0.0;
    for (int i = 0; i < 4; i++) s += moei2_rng_uniform(rng) - 0.5;
    return s;
}

/* X (t x n), with channel 0 an outlier; G = X^T X (row-major, n x n). */
static void make_gram(moei2_rng *rng, int64_t t, int64_t n, double *x, double *g) {
    for (int64_t i = 0; i < t * n; i++) x[i] = noise(rng);
    for (int64_t i = 0; i < t; i++) x[i * n] *= 30.0;
    for (int64_t a = 0; a < n; a++)
        for (int64_t b = 0; b < n; b++) {
            double s = 0.0;
            for (int64_t i = 0; i < t; i++) s += x[i * n + a] * x[i * n + b];
            g[a * n + b] = s;
        }
}

/* ||(W - A B) X^T||_F, all row-major float64. */
static double residual(const double *w, const double *a, const double *b, const double *x, int64_t m, int64_t n,
                       int64_t r, int64_t t) {
    double *d = malloc((size_t)(m * n) * sizeof(double));
    double total = 0.0;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = w[i * n + j];
            for (int64_t c = 0; c < r; c++) s -= a[i * r + c] * b[c * n + j];
            d[i * n + j] = s;
        }
    for (int64_t i = 0; i < m; i++)
        for (int64_t k = 0; k < t; k++) {
            double s = 0.0;
            for (int64_t j = 0; j < n; j++) s += d[i * n + j] * x[k * n + j];
            total += s * s;
        }
    free(d);
    return sqrt(total);
}

/* max |A^T A - I| */
static double orthonormality_error(const double *a, int64_t m, int64_t r) {
    double worst = 0.0;
    for (int64_t p = 0; p < r; p++)
        for (int64_t q = 0; q < r; q++) {
            double s = 0.0;
            for (int64_t i = 0; i < m; i++) s += a[i * r + p] * a[i * r + q];
            worst = fmax(worst, fabs(s - (p == q ? 1.0 : 0.0)));
        }
    return worst;
}

static moei2_lowrank_job job_of(const void *w, int64_t m, int64_t n, const double *g, int64_t r, void *a,
                                void *b) {
    moei2_lowrank_job job;
    memset(&job, 0, sizeof(job));
    job.dtype = MOEI2_FLOAT64;
    job.weight = w;
    job.rows = m;
    job.cols = n;
    job.gram = g;
    job.rank = r;
    job.a = a;
    job.b = b;
    return job;
}

/* Optimality: no rank-r matrix beats the eigen-route loss, the reported loss equals the residual
 * measured from X, and the factors' loss does not grow when the rank grows. Both routes. */
static void test_weighted_optimum(int64_t m, int64_t n, int64_t t) {
    moei2_rng rng;
    moei2_rng_seed(&rng, (uint64_t)(m * 1000 + n));
    double *w = malloc((size_t)(m * n) * sizeof(double)), *x = malloc((size_t)(t * n) * sizeof(double));
    double *g = malloc((size_t)(n * n) * sizeof(double));
    int64_t k = m < n ? m : n;
    double *a = malloc((size_t)(m * k) * sizeof(double)), *b = malloc((size_t)(k * n) * sizeof(double));
    for (int64_t i = 0; i < m * n; i++) w[i] = noise(&rng);
    make_gram(&rng, t, n, x, g);
    double previous = INFINITY;
    for (int64_t r = 1; r <= k; r++) {
        moei2_lowrank_job job = job_of(w, m, n, g, r, a, b);
        CHECK(moei2_lowrank_decompose(&job) == MOEI2_OK);
        CHECK(job.info.route == (m <= n ? MOEI2_LOWRANK_ROUTE_LEFT_GRAM : MOEI2_LOWRANK_ROUTE_QR));
        CHECK(job.info.whitened == 1 && job.info.fallback[0] == '\0' && !job.info.indefinite);
        double measured = residual(w, a, b, x, m, n, r, t);
        CHECK_CLOSE(measured / job.info.energy, job.info.loss / job.info.energy, 1e-7);
        CHECK(job.info.loss <= previous * (1 + 1e-12) + 1e-12);
        previous = job.info.loss;
        CHECK(orthonormality_error(a, m, r) < 1e-10);
        /* A competitor: the plain SVD truncation is never better in the weighted norm. */
        moei2_lowrank_job plain = job_of(w, m, n, NULL, r, a, b);
        CHECK(moei2_lowrank_decompose(&plain) == MOEI2_OK);
        CHECK(residual(w, a, b, x, m, n, r, t) >= job.info.loss * (1 - 1e-9));
    }
    free(w); free(x); free(g); free(a); free(b);
}

/* Without a Gram: the singular values of a known matrix W = U diag(s) V^T. */
static void test_plain_svd_known_spectrum(void) {
    const int64_t m = 5, n = 7, r = 2;
    double w[35] = {0}, a[10], b[14];
    const double s[5] = {9.0, 5.0, 3.0, 2.0, 1.0};
    /* Orthonormal rows/cols: signed permutations. */
    const int col_of_row[5] = {3, 0, 6, 2, 5};
    for (int i = 0; i < 5; i++) w[i * n + col_of_row[i]] = (i % 2 ? -1.0 : 1.0) * s[i];
    moei2_lowrank_job job = job_of(w, m, n, NULL, r, a, b);
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_OK);
    CHECK(!job.info.whitened);
    CHECK_CLOSE(job.info.loss, sqrt(9.0 + 4.0 + 1.0), 1e-12);
    CHECK_CLOSE(job.info.energy, sqrt(81.0 + 25.0 + 9.0 + 4.0 + 1.0), 1e-12);
    CHECK_CLOSE(job.info.max_eigenvalue, 81.0, 1e-12);
    /* AB keeps exactly the two largest entries. */
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double v = a[i * r] * b[j] + a[i * r + 1] * b[n + j];
            double want = i < 2 && j == col_of_row[i] ? w[i * n + j] : 0.0;
            CHECK(fabs(v - want) < 1e-12);
        }
}

/* Singular and zero Grams are ordinary input. */
static void test_singular_and_zero_grams(void) {
    const int64_t m = 6, n = 9, t = 2;
    moei2_rng rng;
    moei2_rng_seed(&rng, 5);
    double w[54], x[18], g[81], a[54], b[81];
    for (int i = 0; i < 54; i++) w[i] = noise(&rng);
    make_gram(&rng, t, n, x, g);
    for (int64_t r = 1; r <= m; r++) {
        moei2_lowrank_job job = job_of(w, m, n, g, r, a, b);
        CHECK(moei2_lowrank_decompose(&job) == MOEI2_OK);
        CHECK(isfinite(job.info.loss));
        if (r >= t) CHECK(job.info.loss < 1e-6 * job.info.energy); /* rank(G) = 2 */
        CHECK_CLOSE(residual(w, a, b, x, m, n, r, t) / job.info.energy, job.info.loss / job.info.energy, 1e-7);
    }
    memset(g, 0, sizeof(g));
    moei2_lowrank_job zero = job_of(w, m, n, g, 2, a, b);
    CHECK(moei2_lowrank_decompose(&zero) == MOEI2_OK);
    CHECK(zero.info.gram_is_zero && !zero.info.whitened && zero.info.loss == 0.0);
    /* Tall route with a singular Gram. */
    double wt[54];
    for (int i = 0; i < 54; i++) wt[i] = noise(&rng);
    double x2[12], g2[36], a2[27], b2[18];
    make_gram(&rng, 2, 6, x2, g2);
    moei2_lowrank_job tall = job_of(wt, 9, 6, g2, 3, a2, b2);
    CHECK(moei2_lowrank_decompose(&tall) == MOEI2_OK);
    CHECK(tall.info.route == MOEI2_LOWRANK_ROUTE_QR && tall.info.loss < 1e-6 * tall.info.energy);
}

static void test_float32(void) {
    const int64_t m = 12, n = 8, t = 20, r = 3;
    moei2_rng rng;
    moei2_rng_seed(&rng, 9);
    float wf[96], af[36], bf[24];
    double w[96], x[160], g[64], a[36], b[24];
    for (int i = 0; i < 96; i++) w[i] = wf[i] = (float)noise(&rng);
    make_gram(&rng, t, n, x, g);
    moei2_lowrank_job job = job_of(wf, m, n, g, r, af, bf);
    job.dtype = MOEI2_FLOAT32;
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_OK);
    moei2_lowrank_job job64 = job_of(w, m, n, g, r, a, b);
    CHECK(moei2_lowrank_decompose(&job64) == MOEI2_OK);
    CHECK_CLOSE(job.info.loss, job64.info.loss, 1e-12); /* same float64 problem */
    for (int i = 0; i < 36; i++) a[i] = af[i];
    for (int i = 0; i < 24; i++) b[i] = bf[i];
    CHECK_CLOSE(residual(w, a, b, x, m, n, r, t) / job.info.energy, job.info.loss / job.info.energy, 1e-5);
}

static void test_fallback_chain(void) {
    const int64_t m = 7, n = 10, t = 15, r = 3;
    moei2_rng rng;
    moei2_rng_seed(&rng, 11);
    double w[70], x[150], g[100], a[21], b[30];
    for (int i = 0; i < 70; i++) w[i] = noise(&rng);
    make_gram(&rng, t, n, x, g);
    moei2_lowrank_job base = job_of(w, m, n, g, r, a, b);
    CHECK(moei2_lowrank_decompose(&base) == MOEI2_OK && base.info.solver == MOEI2_EIG_MRRR);
    for (unsigned skip = 1; skip < 8; skip++) {
        moei2_lowrank_job job = job_of(w, m, n, g, r, a, b);
        job.skip_solvers = skip;
        moei2_status status = moei2_lowrank_decompose(&job);
        if (skip == 7) {
            CHECK(status == MOEI2_ERR_LAPACK);
            CHECK(strstr(job.info.fallback, "dsyev skipped") != NULL);
            continue;
        }
        CHECK(status == MOEI2_OK);
        int expected = (skip & 1) == 0 ? 0 : (skip & 2) == 0 ? 1 : 2;
        CHECK((int)job.info.solver == expected);
        CHECK((expected == 0) == (job.info.fallback[0] == '\0'));
        CHECK_CLOSE(job.info.loss, base.info.loss, 1e-9);
        CHECK_CLOSE(residual(w, a, b, x, m, n, r, t) / job.info.energy, base.info.loss / base.info.energy, 1e-7);
    }
}

/* decompose_many with 1 and 3 threads equals one call per job, bit for bit; and a single call
 * with several BLAS threads (its own blocks in parallel) equals both. */
static void test_many_is_thread_independent(void) {
    enum { JOBS = 5 };
    const int64_t shapes[JOBS][2] = {{300, 140}, {140, 300}, {40, 40}, {1, 9}, {9, 1}};
    moei2_rng rng;
    moei2_rng_seed(&rng, 13);
    double *w[JOBS], *g[JOBS], *out[3][JOBS][2];
    moei2_lowrank_job jobs[3][JOBS];
    for (int j = 0; j < JOBS; j++) {
        int64_t m = shapes[j][0], n = shapes[j][1], t = 2 * n + 1, r = (m < n ? m : n) / 2 + 1;
        w[j] = malloc((size_t)(m * n) * sizeof(double));
        g[j] = malloc((size_t)(n * n) * sizeof(double));
        double *x = malloc((size_t)(t * n) * sizeof(double));
        for (int64_t i = 0; i < m * n; i++) w[j][i] = noise(&rng);
        make_gram(&rng, t, n, x, g[j]);
        free(x);
        for (int v = 0; v < 3; v++) {
            out[v][j][0] = malloc((size_t)(m * r) * sizeof(double));
            out[v][j][1] = malloc((size_t)(r * n) * sizeof(double));
            jobs[v][j] = job_of(w[j], m, n, j == 2 ? NULL : g[j], r, out[v][j][0], out[v][j][1]);
        }
    }
    int before = moei2_blas_get_num_threads();
    moei2_blas_set_num_threads(3);
    for (int j = 0; j < JOBS; j++) CHECK(moei2_lowrank_decompose(&jobs[0][j]) == MOEI2_OK);
    CHECK(moei2_blas_get_num_threads() == 3);
    CHECK(moei2_lowrank_decompose_many(jobs[1], JOBS, 1) == MOEI2_OK);
    CHECK(moei2_lowrank_decompose_many(jobs[2], JOBS, 3) == MOEI2_OK);
    CHECK(moei2_blas_get_num_threads() == 3);
    moei2_blas_set_num_threads(before);
    for (int j = 0; j < JOBS; j++) {
        int64_t m = shapes[j][0], n = shapes[j][1], r = jobs[0][j].rank;
        for (int v = 1; v < 3; v++) {
            CHECK(jobs[v][j].status == MOEI2_OK);
            CHECK(memcmp(out[0][j][0], out[v][j][0], (size_t)(m * r) * sizeof(double)) == 0);
            CHECK(memcmp(out[0][j][1], out[v][j][1], (size_t)(r * n) * sizeof(double)) == 0);
            CHECK(jobs[0][j].info.loss == jobs[v][j].info.loss);
        }
    }
    for (int j = 0; j < JOBS; j++) {
        free(w[j]);
        free(g[j]);
        for (int v = 0; v < 3; v++) {
            free(out[v][j][0]);
            free(out[v][j][1]);
        }
    }
    CHECK(moei2_lowrank_decompose_many(NULL, 0, 2) == MOEI2_OK);
    CHECK(moei2_lowrank_decompose_many(NULL, 1, 2) == MOEI2_ERR_ARG);
}

static void test_bad_arguments(void) {
    double w[6] = {1, 2, 3, 4, 5, 6}, a[6], b[6];
    moei2_lowrank_job job = job_of(w, 2, 3, NULL, 3, a, b);
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_ERR_ARG); /* rank > min(m, n) */
    job = job_of(w, 2, 3, NULL, 0, a, b);
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_ERR_ARG);
    job = job_of(NULL, 2, 3, NULL, 1, a, b);
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_ERR_ARG);
    CHECK(moei2_lowrank_decompose(NULL) == MOEI2_ERR_ARG);
    /* An indefinite "Gram" is detected from the spectrum. */
    double eye[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    double bad[9] = {1.0, 0.9, -0.9, 0.9, 1.0, 0.9, -0.9, 0.9, 1.0};
    double a3[3], b3[3];
    job = job_of(eye, 3, 3, bad, 1, a3, b3);
    CHECK(moei2_lowrank_decompose(&job) == MOEI2_OK && job.info.indefinite);
}

static void test_check_gram(void) {
    int64_t row = -1, col = -1;
    double good[4] = {4, 2, 2, 1};
    CHECK(moei2_lowrank_check_gram(good, 2, &row, &col) == 0);
    double negative[4] = {4, 0, 0, -1};
    CHECK(moei2_lowrank_check_gram(negative, 2, &row, &col) == 1 && row == 1 && col == 1);
    double asym[4] = {4, 1, 0, 1};
    CHECK(moei2_lowrank_check_gram(asym, 2, &row, &col) == 2 && row == 0 && col == 1);
    double large[4] = {1, 3, 3, 1};
    CHECK(moei2_lowrank_check_gram(large, 2, &row, &col) == 3);
}

static void test_allocate_ranks(void) {
    const double importance[5] = {0.0, 1.0, 10.0, 100.0, 1000.0};
    const int64_t rows[5] = {1408, 1408, 1408, 1408, 1408}, cols[5] = {2048, 2048, 2048, 2048, 2048};
    int64_t ranks[5], budget = 0, caps = 0;
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, 300.0, -1.0, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_OK);
    CHECK(budget == 1500 && caps == 5 * (1408 * 2048 / (1408 + 2048)));
    int64_t sum = 0;
    for (int j = 0; j < 5; j++) sum += ranks[j];
    CHECK(sum == 1500);
    for (int j = 1; j < 5; j++) CHECK(ranks[j] >= ranks[j - 1]);
    /* Every rank is within one of its real-valued share. */
    double wsum = 0, wj[5];
    for (int j = 0; j < 5; j++) wsum += wj[j] = pow(importance[j] + 1e-8, 0.15);
    for (int j = 0; j < 5; j++) CHECK(fabs((double)ranks[j] - wj[j] / wsum * 1500.0) < 1.0);
    /* alpha = 0: equal ranks. */
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, 300.0, -1.0, 0.0, 1e-8, ranks, &budget, &caps) == MOEI2_OK);
    for (int j = 0; j < 5; j++) CHECK(ranks[j] == 300);
    /* keep_ratio: the parameters kept are that fraction of the dense ones. */
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, -1.0, 0.5, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_OK);
    sum = 0;
    for (int j = 0; j < 5; j++) sum += ranks[j];
    CHECK(fabs((double)sum * (1408 + 2048) / (5.0 * 1408 * 2048) - 0.5) < 1e-3);
    /* The cap binds and the remainder moves to the others; the floor of 1 binds and is paid back. */
    const double skewed[3] = {1e6, 1.0, 1.0};
    const int64_t r3[3] = {4, 100, 100}, c3[3] = {4, 100, 100};
    CHECK(moei2_allocate_ranks(skewed, r3, c3, 3, 20.0, -1.0, 1.0, 1e-8, ranks, &budget, &caps) == MOEI2_OK);
    CHECK(ranks[0] == 2 && ranks[1] + ranks[2] == 58 && ranks[1] == 29);
    const double tiny[5] = {1.0, 1e-12, 1e-12, 1e-12, 1e-12};
    const int64_t r5[5] = {50, 50, 50, 50, 50};
    CHECK(moei2_allocate_ranks(tiny, r5, r5, 5, 2.0, -1.0, 1.0, 0.0, ranks, &budget, &caps) == MOEI2_OK);
    CHECK(ranks[0] == 6 && ranks[1] == 1 && ranks[4] == 1);
    /* Refusals: budget below M or above the caps, both or neither budget, negative importance. */
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, 0.1, -1.0, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_ERR_ARG);
    CHECK(budget == 1);
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, 1e6, -1.0, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_ERR_ARG);
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, 3.0, 0.5, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_ERR_ARG);
    CHECK(moei2_allocate_ranks(importance, rows, cols, 5, -1.0, -1.0, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_ERR_ARG);
    const double negative[2] = {1.0, -1.0};
    CHECK(moei2_allocate_ranks(negative, rows, cols, 2, 3.0, -1.0, 0.15, 1e-8, ranks, &budget, &caps) == MOEI2_ERR_ARG);
}

int main(void) {
    test_weighted_optimum(6, 11, 30);
    test_weighted_optimum(11, 6, 30);
    test_weighted_optimum(8, 8, 5);
    test_plain_svd_known_spectrum();
    test_singular_and_zero_grams();
    test_float32();
    test_fallback_chain();
    test_many_is_thread_independent();
    test_bad_arguments();
    test_check_gram();
    test_allocate_ranks();
    return check_report("test_lowrank");
}
