/* Search kernels: the cached loss against a direct recomputation of the re-routed output,
 * importance, exhaustive enumeration, greedy, and the genetic search's reproducibility and
 * optimality on enumerable layers. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "moei2_core.h"

typedef struct {
    int64_t N, E, d, k, C, nb;
    int renorm;
    double scaling;
    double *logits;   /* [N, E] */
    double *outputs;  /* [E, N, d] */
    int64_t batch_ends[4];
    /* cache storage */
    int32_t *cand;
    double *cprob, *probs, *factor, *norm2;
    uint64_t *bits;
    moei2_search_cache cache;
} test_layer;

static double gaussian(moei2_rng *rng) {
    double u = moei2_rng_uniform(rng) + 1e-300, v = moei2_rng_uniform(rng);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static int make_layer(test_layer *t, int64_t N, int64_t E, int64_t d, int64_t k, int64_t r_max, int renorm,
                      double scaling, uint64_t seed) {
    memset(t, 0, sizeof *t);
    t->N = N; t->E = E; t->d = d; t->k = k; t->C = k + r_max; t->renorm = renorm; t->scaling = scaling;
    t->nb = 3;
    t->batch_ends[0] = N / 3; t->batch_ends[1] = N / 2; t->batch_ends[2] = N;
    const int64_t C = t->C, W = MOEI2_MASK_WORDS(E);
    moei2_rng rng;
    moei2_rng_seed(&rng, seed);
    t->logits = malloc((size_t)(N * E) * sizeof(double));
    t->outputs = malloc((size_t)(E * N * d) * sizeof(double));
    t->cand = malloc((size_t)(N * C) * sizeof(int32_t));
    t->cprob = malloc((size_t)(N * C) * sizeof(double));
    t->probs = renorm ? NULL : malloc((size_t)(N * E) * sizeof(double));
    t->bits = malloc((size_t)(N * W) * sizeof(uint64_t));
    t->factor = malloc((size_t)(N * MOEI2_PACKED_SIZE(C)) * sizeof(double));
    t->norm2 = malloc((size_t)N * sizeof(double));
    double *gathered = malloc((size_t)(N * C * d) * sizeof(double));
    if (!t->logits || !t->outputs || !t->cand || !t->cprob || (!renorm && !t->probs) || !t->bits || !t->factor ||
        !t->norm2 || !gathered) {
        free(gathered);
        return 0;
    }
    for (int64_t i = 0; i < N * E; i++) t->logits[i] = 1.5 * gaussian(&rng);
    for (int64_t i = 0; i < E * N * d; i++) t->outputs[i] = gaussian(&rng);
    int ok = moei2_search_prepare(N, E, k, C, t->logits, t->cand, t->cprob, t->probs, t->bits) == MOEI2_OK;
    for (int64_t n = 0; n < N; n++)
        for (int64_t q = 0; q < C; q++)
            memcpy(gathered + (n * C + q) * d, t->outputs + ((int64_t)t->cand[n * C + q] * N + n) * d,
                   (size_t)d * sizeof(double));
    ok = ok && moei2_search_factor(N, C, d, NULL, gathered, k, renorm, scaling, t->cprob, t->factor, t->norm2, 2, NULL) ==
                   MOEI2_OK;
    free(gathered);
    t->cache = (moei2_search_cache){N, E, k, C, renorm, scaling, t->nb, t->batch_ends, t->cand, t->cprob,
                                    t->probs, t->bits, t->factor, t->norm2, MOEI2_WEIGHTS_SOFTMAX, 0.0, NULL, 1, 1, 0.0};
    return ok;
}

static void free_layer(test_layer *t) {
    free(t->logits); free(t->outputs); free(t->cand); free(t->cprob); free(t->probs);
    free(t->bits); free(t->factor); free(t->norm2);
}

/* The routed output of token n with the experts in `dropped` removed, recomputed from scratch:
 * -inf logits, softmax over survivors, top-k (ties to the lower index), renormalise, scale. */
static void routed_output(const test_layer *t, int64_t n, const int *dropped, double *y) {
    const int64_t E = t->E, d = t->d, k = t->k;
    const double *z = t->logits + n * E;
    double top = -INFINITY, total = 0.0;
    for (int64_t j = 0; j < E; j++) if (!dropped[j] && z[j] > top) top = z[j];
    for (int64_t j = 0; j < E; j++) if (!dropped[j]) total += exp(z[j] - top);
    int chosen[64] = {0};
    int64_t pick[64];
    double w[64], wsum = 0.0;
    for (int64_t q = 0; q < k; q++) {
        int64_t best = -1;
        for (int64_t j = 0; j < E; j++)
            if (!dropped[j] && !chosen[j] && (best < 0 || z[j] > z[best])) best = j;
        chosen[best] = 1;
        pick[q] = best;
        w[q] = exp(z[best] - top) / total;
        wsum += w[q];
    }
    memset(y, 0, (size_t)d * sizeof(double));
    for (int64_t q = 0; q < k; q++) {
        double wq = t->scaling * (t->renorm ? w[q] / wsum : w[q]);
        for (int64_t i = 0; i < d; i++) y[i] += wq * t->outputs[(pick[q] * t->N + n) * d + i];
    }
}

static double direct_loss(const test_layer *t, const int *dropped) {
    static const int none[64] = {0};
    double *y = malloc((size_t)t->d * sizeof(double)), *ys = malloc((size_t)t->d * sizeof(double));
    double loss = 0.0;
    int64_t start = 0;
    for (int64_t b = 0; b < t->nb; b++) {
        double acc = 0.0;
        for (int64_t n = start; n < t->batch_ends[b]; n++) {
            routed_output(t, n, none, y);
            routed_output(t, n, dropped, ys);
            for (int64_t i = 0; i < t->d; i++) acc += (y[i] - ys[i]) * (y[i] - ys[i]);
        }
        loss += sqrt(acc);
        start = t->batch_ends[b];
    }
    free(y);
    free(ys);
    return loss;
}

static void mask_from_list(uint64_t *mask, int64_t W, const int *dropped, int64_t E) {
    memset(mask, 0, (size_t)W * sizeof(uint64_t));
    for (int64_t j = 0; j < E; j++) if (dropped[j]) mask[j >> 6] |= (uint64_t)1 << (j & 63);
}

/* Every mask of size <= r_max scored by the cache equals the direct recomputation. */
static void test_loss_matches_direct(int renorm, double scaling, int64_t E, int64_t k, int64_t r_max) {
    test_layer t;
    CHECK(make_layer(&t, 30, E, 5, k, r_max, renorm, scaling, 11 + (uint64_t)E));
    const int64_t W = MOEI2_MASK_WORDS(E);
    int64_t total = (int64_t)1 << E, count = 0;
    uint64_t *masks = malloc((size_t)(total * W) * sizeof(uint64_t));
    double *direct = malloc((size_t)total * sizeof(double)), *cached = malloc((size_t)total * sizeof(double));
    for (int64_t bitsv = 0; bitsv < total; bitsv++) {
        int dropped[64] = {0}, r = 0;
        for (int64_t j = 0; j < E; j++) if ((bitsv >> j) & 1) { dropped[j] = 1; r++; }
        if (r > r_max) continue;
        mask_from_list(masks + count * W, W, dropped, E);
        direct[count++] = direct_loss(&t, dropped);
    }
    CHECK(moei2_search_loss(&t.cache, masks, count, 3, cached) == MOEI2_OK);
    double worst = 0.0;
    for (int64_t i = 0; i < count; i++) {
        double rel = fabs(cached[i] - direct[i]) / fmax(direct[i], 1e-300);
        if (direct[i] == 0.0) rel = fabs(cached[i]);
        if (rel > worst) worst = rel;
    }
    CHECK(worst < 1e-11);
    if (worst >= 1e-11) fprintf(stderr, "  renorm=%d scaling=%g: worst relative error %g\n", renorm, scaling, worst);
    /* The empty mask costs exactly nothing. */
    CHECK(cached[0] == 0.0);
    /* A mask dropping more than r_max experts is refused. */
    int too_many[64] = {0};
    for (int64_t j = 0; j <= r_max; j++) too_many[j] = 1;
    mask_from_list(masks, W, too_many, E);
    CHECK(moei2_search_loss(&t.cache, masks, 1, 1, cached) == MOEI2_ERR_ARG);
    free(masks); free(direct); free(cached);
    free_layer(&t);
}

/* A layer wide enough (C = 22) that re-routed tokens reach past the 8th and 16th candidate:
 * random masks of every size up to r_max, plus masks keeping a token's favourite expert but
 * dropping its next 15, so that its new top-k is candidates 0 and 16..20. */
static void test_loss_matches_direct_wide(int renorm, double scaling) {
    const int64_t N = 24, E = 40, k = 6, r_max = 16, M = 48;
    test_layer t;
    CHECK(make_layer(&t, N, E, 30, k, r_max, renorm, scaling, 77 + (uint64_t)renorm));
    const int64_t W = MOEI2_MASK_WORDS(E);
    moei2_rng rng;
    moei2_rng_seed(&rng, 5);
    uint64_t *masks = malloc((size_t)(M * W) * sizeof(uint64_t));
    double direct[48], cached[48];
    for (int64_t i = 0; i < M; i++) {
        int dropped[64] = {0};
        if (i < 8) {
            for (int64_t q = 1; q <= 15; q++) dropped[t.cand[(i * 3) * t.C + q]] = 1;
        } else {
            int64_t r = 1 + i % r_max, have = 0;
            while (have < r) {
                int64_t j = (int64_t)moei2_rng_below(&rng, (uint64_t)E);
                if (!dropped[j]) { dropped[j] = 1; have++; }
            }
        }
        mask_from_list(masks + i * W, W, dropped, E);
        direct[i] = direct_loss(&t, dropped);
    }
    CHECK(moei2_search_loss(&t.cache, masks, M, 2, cached) == MOEI2_OK);
    for (int64_t i = 0; i < M; i++) CHECK_CLOSE(cached[i], direct[i], 1e-11);
    free(masks);
    free_layer(&t);
}

static void test_importance_and_greedy(void) {
    test_layer t;
    CHECK(make_layer(&t, 24, 8, 4, 2, 3, 0, 1.0, 5));
    double imp[8];
    CHECK(moei2_search_expert_importance(&t.cache, 2, imp) == MOEI2_OK);
    for (int j = 0; j < 8; j++) {
        int dropped[64] = {0};
        dropped[j] = 1;
        CHECK_CLOSE(imp[j], direct_loss(&t, dropped), 1e-11);
    }
    uint64_t mask[1];
    double best[3], mean[3];
    int64_t evals = 0;
    CHECK(moei2_search_greedy(&t.cache, 3, 2, mask, best, mean, &evals) == MOEI2_OK);
    CHECK(evals == 8 + 7 + 6);
    CHECK(__builtin_popcountll(mask[0]) == 3);
    /* The first greedy step picks the least important expert. */
    int least = 0;
    for (int j = 1; j < 8; j++) if (imp[j] < imp[least]) least = j;
    CHECK((mask[0] >> least) & 1);
    CHECK_CLOSE(best[0], imp[least], 1e-14);
    for (int s = 0; s < 3; s++) CHECK(best[s] <= mean[s]);
    CHECK(moei2_search_greedy(&t.cache, 4, 2, mask, best, mean, &evals) == MOEI2_ERR_ARG);
    free_layer(&t);
}

static void test_combinations(void) {
    CHECK(moei2_combinations(8, 2) == 28);
    CHECK(moei2_combinations(16, 4) == 1820);
    CHECK(moei2_combinations(60, 15) == 53194089192720ULL);
    CHECK(moei2_combinations(5, 0) == 1);
    CHECK(moei2_combinations(5, 6) == 0);
    CHECK(moei2_combinations(200, 100) == UINT64_MAX);
}

/* Exhaustive search returns the brute-force ranking; the genetic search finds the optimum
 * on every enumerable case and is reproducible across thread counts. */
static void test_searches(int64_t E, int64_t k, int64_t r, int renorm, uint64_t seed) {
    test_layer t;
    CHECK(make_layer(&t, 36, E, 4, k, r, renorm, renorm ? 1.0 : 2.0, seed));
    const int64_t W = MOEI2_MASK_WORDS(E), K = 4;
    uint64_t ex_masks[4 * 1], ga_masks[4 * 1], ga_masks2[4 * 1];
    double ex_loss[4], ga_loss[4], ga_loss2[4], hb[50], hm[50], hb2[50], hm2[50];
    moei2_search_result ex = {ex_masks, ex_loss, 0, NULL, NULL, 0, 0};
    CHECK(moei2_search_exhaustive(&t.cache, r, K, 2, &ex) == MOEI2_OK);
    CHECK(ex.found == K);
    CHECK((uint64_t)ex.evaluations == moei2_combinations(E, r));
    /* brute force minimum over every r-subset */
    double best = INFINITY;
    int64_t idx[16];
    for (int64_t i = 0; i < r; i++) idx[i] = i;
    for (;;) {
        int dropped[64] = {0};
        for (int64_t i = 0; i < r; i++) dropped[idx[i]] = 1;
        double l = direct_loss(&t, dropped);
        if (l < best) best = l;
        int64_t i = r - 1;
        while (i >= 0 && idx[i] == E - r + i) i--;
        if (i < 0) break;
        idx[i]++;
        for (int64_t j = i + 1; j < r; j++) idx[j] = idx[j - 1] + 1;
    }
    CHECK_CLOSE(ex_loss[0], best, 1e-11);
    for (int64_t i = 1; i < K; i++) CHECK(ex_loss[i - 1] <= ex_loss[i]);

    moei2_genetic_params p = {r, 100, 50, 20, 0.3, K, 1};
    moei2_rng rng;
    moei2_rng_seed(&rng, seed * 7 + 1);
    moei2_search_result ga = {ga_masks, ga_loss, 0, hb, hm, 0, 0};
    CHECK(moei2_search_genetic(&t.cache, &p, &rng, &ga) == MOEI2_OK);
    CHECK(ga.found == K);
    CHECK(ga_loss[0] == ex_loss[0]);
    CHECK(memcmp(ga_masks, ex_masks, (size_t)W * sizeof(uint64_t)) == 0);
    for (int64_t g = 1; g < ga.history_length; g++) CHECK(hb[g] <= hb[g - 1]);
    for (int64_t i = 0; i < K; i++) CHECK(__builtin_popcountll(ga_masks[i]) == r);

    p.num_threads = 3;
    moei2_rng_seed(&rng, seed * 7 + 1);
    moei2_search_result ga2 = {ga_masks2, ga_loss2, 0, hb2, hm2, 0, 0};
    CHECK(moei2_search_genetic(&t.cache, &p, &rng, &ga2) == MOEI2_OK);
    CHECK(ga2.evaluations == ga.evaluations && ga2.history_length == ga.history_length);
    CHECK(memcmp(ga_masks, ga_masks2, sizeof ga_masks) == 0);
    CHECK(memcmp(ga_loss, ga_loss2, sizeof ga_loss) == 0);
    CHECK(memcmp(hb, hb2, (size_t)ga.history_length * sizeof(double)) == 0);
    CHECK(memcmp(hm, hm2, (size_t)ga.history_length * sizeof(double)) == 0);
    free_layer(&t);
}

static void test_genetic_small_space(void) {
    /* 28 masks, population 100: generation 0 scores the whole space and the search stops. */
    test_layer t;
    CHECK(make_layer(&t, 20, 8, 3, 2, 2, 1, 1.0, 99));
    uint64_t masks[3];
    double loss[3], hb[50], hm[50];
    moei2_genetic_params p = {2, 100, 50, 20, 0.3, 3, 1};
    moei2_rng rng;
    moei2_rng_seed(&rng, 3);
    moei2_search_result res = {masks, loss, 0, hb, hm, 0, 0};
    CHECK(moei2_search_genetic(&t.cache, &p, &rng, &res) == MOEI2_OK);
    CHECK(res.evaluations == 28);
    CHECK(res.history_length == 1);
    p.drop_count = 3; /* more than r_max */
    CHECK(moei2_search_genetic(&t.cache, &p, &rng, &res) == MOEI2_ERR_ARG);
    free_layer(&t);
}

/* ---- routing rules beyond softmax ---------------------------------------------------------- */

typedef struct {
    moei2_routing_rule rule;
    const double *logits, *outputs; /* [N, E], [E, N, d] */
    int64_t N, E, d;
} rule_layer;

/* Token n's routed output under the rule with `dropped` removed, from the definitions: every
 * survivor's score and key, groups ranked by a full sort, the top-k by a full sort. */
static void rule_output(const rule_layer *t, int64_t n, const int *dropped, double *y) {
    const moei2_routing_rule *r = &t->rule;
    const int64_t E = t->E, k = r->top_k;
    const double *z = t->logits + n * E;
    double score[64], key[64], top = -INFINITY, total = 0.0;
    for (int64_t j = 0; j < E; j++) if (!dropped[j] && z[j] > top) top = z[j];
    for (int64_t j = 0; j < E; j++) if (!dropped[j]) total += exp(z[j] - top);
    for (int64_t j = 0; j < E; j++) {
        if (r->weights == MOEI2_WEIGHTS_SOFTMAX) score[j] = exp(z[j] - top) / total;
        else if (r->weights == MOEI2_WEIGHTS_SIGMOID) score[j] = 1.0 / (1.0 + exp(-z[j]));
        else score[j] = 1.0;
        const int by_logit = r->weights == MOEI2_WEIGHTS_UNIT || r->weights == MOEI2_WEIGHTS_SPARSEMIXER ||
                             (r->weights == MOEI2_WEIGHTS_SOFTMAX && !r->choice_bias);
        key[j] = by_logit ? z[j] : score[j] + (r->choice_bias ? r->choice_bias[j] : 0.0);
    }
    int eligible[64];
    for (int64_t j = 0; j < E; j++) eligible[j] = !dropped[j];
    if (r->num_groups > r->top_groups) {
        const int64_t G = r->num_groups, size = E / G;
        double gs[64];
        int64_t order[64], alive[64];
        for (int64_t g = 0; g < G; g++) {
            double a = -INFINITY, b = -INFINITY;
            alive[g] = 0;
            for (int64_t j = g * size; j < (g + 1) * size; j++) {
                if (dropped[j]) continue;
                alive[g]++;
                if (key[j] > a) { b = a; a = key[j]; } else if (key[j] > b) b = key[j];
            }
            gs[g] = alive[g] >= 2 ? a + b : -INFINITY;
            order[g] = g;
        }
        for (int64_t i = 0; i < G; i++)  /* selection sort: score down, group up */
            for (int64_t j = i + 1; j < G; j++)
                if (gs[order[j]] > gs[order[i]] || (gs[order[j]] == gs[order[i]] && order[j] < order[i])) {
                    int64_t x = order[i]; order[i] = order[j]; order[j] = x;
                }
        int taken[64] = {0};
        int64_t held = 0, count = 0;
        while (count < G && (count < r->top_groups || held < k)) { taken[order[count]] = 1; held += alive[order[count]]; count++; }
        for (int64_t j = 0; j < E; j++) eligible[j] = eligible[j] && taken[j / size];
    }
    int64_t pick[64], m = 0;
    for (int64_t j = 0; j < E; j++) if (eligible[j]) pick[m++] = j;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = i + 1; j < m; j++)
            if (key[pick[j]] > key[pick[i]] || (key[pick[j]] == key[pick[i]] && pick[j] < pick[i])) {
                int64_t x = pick[i]; pick[i] = pick[j]; pick[j] = x;
            }
    double sum = 0.0;
    for (int64_t q = 0; q < k; q++) sum += score[pick[q]];
    if (r->weights == MOEI2_WEIGHTS_SPARSEMIXER) {
        /* Pick q weighs 1 / sum of exp(z - m) over the survivors not picked before it within the
         * relative window of its logit m. */
        for (int64_t q = 0; q < k; q++) {
            const double top_q = z[pick[q]];
            double mass = 0.0;
            for (int64_t i = q; i < m; i++) {
                const double zj = z[pick[i]];
                const double gap = (top_q - zj) / fmax(fabs(zj), top_q);
                if (!(gap > r->window)) mass += exp(zj - top_q);
            }
            score[pick[q]] = 1.0 / mass;
        }
    }
    memset(y, 0, (size_t)t->d * sizeof(double));
    for (int64_t q = 0; q < k; q++) {
        const double w = r->scaling * (r->renormalize ? score[pick[q]] / (sum + r->norm_eps) : score[pick[q]]);
        for (int64_t i = 0; i < t->d; i++) y[i] += w * t->outputs[(pick[q] * t->N + n) * t->d + i];
    }
}

/* Every mask of up to r_max experts scored by the cache equals the direct recomputation under
 * the rule, with the candidate count the rule needs (E when it reranks). */
static void test_rule_loss_matches_direct(moei2_routing_rule rule, int64_t E, int64_t r_max, uint64_t seed) {
    const int64_t N = 40, d = 6, k = rule.top_k, W = MOEI2_MASK_WORDS(E), nb = 2;
    const int reranks = moei2_rule_reranks(&rule, E);
    CHECK(reranks >= 0);
    const int64_t C = reranks ? E : k + r_max;
    moei2_rng rng;
    moei2_rng_seed(&rng, seed);
    double *logits = malloc((size_t)(N * E) * sizeof(double));
    double *outputs = malloc((size_t)(E * N * d) * sizeof(double));
    double *gathered = malloc((size_t)(N * C * d) * sizeof(double));
    int32_t *cand = malloc((size_t)(N * C) * sizeof(int32_t));
    double *cp = malloc((size_t)(N * C) * sizeof(double)), *probs = malloc((size_t)(N * E) * sizeof(double));
    double *factor = malloc((size_t)(N * MOEI2_PACKED_SIZE(C)) * sizeof(double)), *norm2 = malloc((size_t)N * sizeof(double));
    uint64_t *bits = malloc((size_t)(N * W) * sizeof(uint64_t));
    for (int64_t i = 0; i < N * E; i++) logits[i] = 1.5 * gaussian(&rng);
    for (int64_t i = 0; i < E * N * d; i++) outputs[i] = gaussian(&rng);
    CHECK(moei2_search_prepare_rule(N, E, &rule, C, logits, cand, cp, probs, bits) == MOEI2_OK);
    for (int64_t n = 0; n < N; n++)
        for (int64_t q = 0; q < C; q++)
            memcpy(gathered + (n * C + q) * d, outputs + ((int64_t)cand[n * C + q] * N + n) * d, (size_t)d * sizeof(double));
    CHECK(moei2_search_factor(N, C, d, NULL, gathered, k, rule.renormalize, rule.scaling, cp, factor, norm2, 2, NULL) ==
          MOEI2_OK);
    int64_t ends[2] = {N / 3, N};
    moei2_search_cache cache = {N, E, k, C, rule.renormalize, rule.scaling, nb, ends, cand, cp, probs, bits, factor,
                                norm2, rule.weights, rule.norm_eps, rule.choice_bias, rule.num_groups, rule.top_groups,
                                rule.window};
    rule_layer t = {rule, logits, outputs, N, E, d};
    const int64_t total = (int64_t)1 << E;
    uint64_t *masks = malloc((size_t)(total * W) * sizeof(uint64_t));
    double *direct = malloc((size_t)total * sizeof(double)), *cached = malloc((size_t)total * sizeof(double));
    double y[16], ys[16];
    static const int none[64] = {0};
    int64_t count = 0;
    for (int64_t m = 0; m < total; m++) {
        int dropped[64] = {0}, r = 0;
        for (int64_t j = 0; j < E; j++) if ((m >> j) & 1) { dropped[j] = 1; r++; }
        if (r > r_max) continue;
        mask_from_list(masks + count * W, W, dropped, E);
        double loss = 0.0;
        int64_t start = 0;
        for (int64_t b = 0; b < nb; b++) {
            double acc = 0.0;
            for (int64_t n = start; n < ends[b]; n++) {
                rule_output(&t, n, none, y);
                rule_output(&t, n, dropped, ys);
                for (int64_t i = 0; i < d; i++) acc += (y[i] - ys[i]) * (y[i] - ys[i]);
            }
            loss += sqrt(acc);
            start = ends[b];
        }
        direct[count++] = loss;
    }
    CHECK(moei2_search_loss(&cache, masks, count, 2, cached) == MOEI2_OK);
    double worst = 0.0;
    int rerouted = 0;
    for (int64_t i = 0; i < count; i++) {
        const double rel = direct[i] == 0.0 ? fabs(cached[i]) : fabs(cached[i] - direct[i]) / direct[i];
        if (rel > worst) worst = rel;
        rerouted += direct[i] > 0.0;
    }
    CHECK(worst < 1e-10);
    CHECK(rerouted > count / 2);
    if (worst >= 1e-10)
        fprintf(stderr, "  rule weights=%d groups=%lld/%lld: worst relative error %g\n", (int)rule.weights,
                (long long)rule.num_groups, (long long)rule.top_groups, worst);
    free(logits); free(outputs); free(gathered); free(cand); free(cp); free(probs); free(factor); free(norm2);
    free(bits); free(masks); free(direct); free(cached);
}

static void test_rules(void) {
    const double bias[12] = {0.3, -0.2, 0.05, 0.4, -0.1, 0.0, 0.25, -0.3, 0.1, 0.15, -0.05, 0.2};
    /* sigmoid + correction bias, renormalised with an epsilon and scaled (DeepSeek-V3, LFM2) */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SIGMOID, 3, 1, 1e-6, 2.5, bias, 1, 1, 0.0}, 10, 4, 1);
    /* sigmoid, not renormalised */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SIGMOID, 2, 0, 0.0, 1.0, bias, 1, 1, 0.0}, 9, 5, 2);
    /* Llama 4: top-1 by logit, weight 1 */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_UNIT, 1, 0, 0.0, 1.0, NULL, 1, 1, 0.0}, 8, 5, 3);
    /* group-limited: 4 groups of 3, 2 taken (DeepSeek-V3); every expert a candidate */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SIGMOID, 3, 1, 1e-20, 2.0, bias, 4, 2, 0.0}, 12, 5, 4);
    /* group-limited with 1 group taken: the fallback to more groups when one holds < k */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SIGMOID, 2, 0, 0.0, 1.0, bias, 4, 1, 0.0}, 8, 5, 5);
    /* softmax with a choice bias (ERNIE 4.5): the order depends on the surviving mass */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SOFTMAX, 2, 1, 0.0, 1.0, bias, 1, 1, 0.0}, 9, 5, 6);
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SOFTMAX, 2, 0, 0.0, 1.0, bias, 1, 1, 0.0}, 9, 4, 7);
    /* sparsemixer (PhiMoE): windows wide enough to hold several survivors of any rank */
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SPARSEMIXER, 2, 0, 0.0, 1.0, NULL, 1, 1, 0.6},
                                  8, 5, 8);
    test_rule_loss_matches_direct((moei2_routing_rule){MOEI2_WEIGHTS_SPARSEMIXER, 3, 0, 0.0, 1.5, NULL, 1, 1, 1.2},
                                  9, 4, 9);
    /* Invalid rules: groups not dividing E, groups on softmax, a bias on unit weights. */
    moei2_routing_rule bad = {MOEI2_WEIGHTS_SIGMOID, 2, 1, 0.0, 1.0, NULL, 3, 1, 0.0};
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    bad.weights = MOEI2_WEIGHTS_SOFTMAX; bad.num_groups = 2;
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    bad = (moei2_routing_rule){MOEI2_WEIGHTS_UNIT, 1, 0, 0.0, 1.0, bias, 1, 1, 0.0};
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    /* sparsemixer: no bias, renormalisation or negative window; a window on another rule */
    bad = (moei2_routing_rule){MOEI2_WEIGHTS_SPARSEMIXER, 2, 0, 0.0, 1.0, bias, 1, 1, 0.1};
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    bad.choice_bias = NULL; bad.renormalize = 1;
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    bad.renormalize = 0; bad.window = -0.1;
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    bad.window = 0.1;
    CHECK(moei2_rule_reranks(&bad, 10) == 1);
    bad.weights = MOEI2_WEIGHTS_SIGMOID;
    CHECK(moei2_rule_reranks(&bad, 10) == -1);
    /* A reranking rule with fewer candidates than experts is refused. */
    bad = (moei2_routing_rule){MOEI2_WEIGHTS_SIGMOID, 2, 1, 0.0, 1.0, bias, 4, 2, 0.0};
    double z[8] = {0}, cp[7], pr[8];
    int32_t c[7];
    uint64_t b[1];
    CHECK(moei2_search_prepare_rule(1, 8, &bad, 7, z, c, cp, pr, b) == MOEI2_ERR_ARG);
}

int main(void) {
    test_loss_matches_direct(1, 1.0, 8, 2, 4);
    test_loss_matches_direct(0, 1.0, 8, 2, 4);
    test_loss_matches_direct(0, 2.5, 9, 3, 3);
    test_loss_matches_direct(1, 0.7, 10, 1, 9);
    test_loss_matches_direct_wide(1, 1.0);
    test_loss_matches_direct_wide(0, 1.0);
    test_loss_matches_direct_wide(0, 2.5);
    test_importance_and_greedy();
    test_combinations();
    for (uint64_t seed = 1; seed <= 3; seed++) {
        test_searches(8, 2, 2, 1, seed);
        test_searches(8, 2, 4, 0, seed);
        test_searches(16, 4, 4, seed % 2, seed);
    }
    test_genetic_small_space();
    test_rules();
    return check_report("test_search");
}
