/* Exact re-routed reconstruction loss of one MoE layer for a batch of expert masks.
 *
 * The cache (see moei2_core.h) replaces each token's candidate output vectors by R, the
 * triangular QR factor of the d x C matrix they form. For a mask S the token's error is
 *   y - y_S = sum_q c_q o_q,   c_q = (old weight of candidate q) - (new weight of q),
 * so ||y - y_S|| = ||R c||. Only candidates up to the k-th survivor can carry a nonzero c_q,
 * and R's column j has j+1 entries, so a token costs O(L^2) with L about k + (dropped among its
 * best experts), independent of the hidden size.
 *
 * The coefficients are formed without subtracting nearly equal weights. With A the old
 * normaliser and B the new one (renormalising: the sums of the old and new top-k
 * probabilities; otherwise 1 and the surviving probability mass 1 - P_S), an expert that stays
 * in the top-k has c_q = s p_q (B - A) / (A B), where B - A is a sum of the probabilities that
 * actually changed: (entrants - dropped) or -P_S. An unaffected token (no top-k expert dropped)
 * contributes exactly 0 when renormalising, and (P_S / (1 - P_S))^2 ||y||^2 otherwise.
 *
 * Since s / A - stay = s / B, the coefficients also split as
 *   c = stay * p_topk + (s / B) * (p on the experts that left) - (s / B) * (p on those entering),
 * and R p_topk is fixed per token: a re-routed token then reads only the 2 * (experts that left)
 * columns of R that changed instead of all L. This form is used where |B - A| <= B (so every
 * coefficient is bounded by max(s/A, s/B), the largest of the direct form, and nothing cancels
 * that the direct form would not); elsewhere the coefficients are formed directly. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_blas.h"
#include "moei2_core.h"
#include "moei2_internal.h"
#include "search_internal.h"

/* ---- preparation: ranking and scores ---------------------------------------------------- */

int moei2_rule_reranks(const moei2_routing_rule *rule, int64_t num_experts) {
    const int64_t E = num_experts, G = rule->num_groups;
    if (rule->weights != MOEI2_WEIGHTS_SOFTMAX && rule->weights != MOEI2_WEIGHTS_SIGMOID &&
        rule->weights != MOEI2_WEIGHTS_UNIT && rule->weights != MOEI2_WEIGHTS_SPARSEMIXER)
        return -1;
    if (rule->top_k < 1 || rule->top_k > E || !(rule->scaling > 0.0) || !isfinite(rule->scaling) ||
        !(rule->norm_eps >= 0.0) || !isfinite(rule->norm_eps))
        return -1;
    if (rule->weights == MOEI2_WEIGHTS_SPARSEMIXER)
        return (rule->choice_bias || G > 1 || rule->renormalize || !(rule->window >= 0.0) || !isfinite(rule->window))
                   ? -1 : 1;
    if (rule->window != 0.0) return -1;
    if (rule->weights == MOEI2_WEIGHTS_UNIT && rule->choice_bias) return -1;
    if (rule->choice_bias)
        for (int64_t j = 0; j < E; j++)
            if (!isfinite(rule->choice_bias[j])) return -1;
    const int grouped = G > 1 && rule->top_groups < G;
    if (G > 1) {
        /* Group scores are sums of keys, which only the sigmoid rules define as scores. */
        if (E % G || rule->top_groups < 1 || rule->top_groups > G || rule->weights != MOEI2_WEIGHTS_SIGMOID) return -1;
    }
    return grouped || (rule->weights == MOEI2_WEIGHTS_SOFTMAX && rule->choice_bias != NULL);
}

static inline double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

/* The experts a token chooses under a reranking rule, as positions in its candidate list (all E
 * experts), and its weights: see the rule in moei2_core.h. drop: [E] bytes or NULL. Scratch:
 * key [E], group_score, group_count [G], taken [G]. chosen [k], weight [k]. */
typedef struct {
    double *key, *group_score;
    int64_t *group_count;
    unsigned char *taken;
} rerank_scratch;

/* SPARSEMIXER: cp holds the logits in candidate order (descending, ties to the lower index), so
 * each pick is the first survivor not yet picked. */
static void sparsemixer_choose(const moei2_search_cache *c, const int32_t *cand, const double *cp,
                               const unsigned char *drop, int64_t *chosen, double *weight) {
    const int64_t E = c->num_experts, k = c->top_k;
    int64_t next = 0;
    for (int64_t i = 0; i < k; i++) {
        while (drop && drop[cand[next]]) next++;
        const int64_t pick = next++;
        const double m = cp[pick];
        double total = 0.0;
        /* Positions before `pick` are dropped or picked earlier: the window starts at the pick. */
        for (int64_t q = pick; q < E; q++) {
            if (drop && drop[cand[q]]) continue;
            const double z = cp[q], factor = fabs(z) > m ? fabs(z) : m;
            if (!((m - z) / factor > c->window)) total += exp(z - m);
        }
        chosen[i] = pick;
        weight[i] = c->scaling / total;
    }
}

static void rerank_choose(const moei2_search_cache *c, const int32_t *cand, const double *cp,
                          const unsigned char *drop, rerank_scratch *w, int64_t *chosen, double *weight) {
    const int64_t E = c->num_experts, k = c->top_k, G = c->num_groups;
    if (c->weights == MOEI2_WEIGHTS_SPARSEMIXER) {
        sparsemixer_choose(c, cand, cp, drop, chosen, weight);
        return;
    }
    const int softmax = c->weights == MOEI2_WEIGHTS_SOFTMAX;
    double z = 1.0;
    if (softmax) {
        /* The survivors' softmax is p / Z with Z their share of the full softmax. */
        z = 0.0;
        for (int64_t q = 0; q < E; q++)
            if (!drop || !drop[cand[q]]) z += cp[q];
    }
    for (int64_t q = 0; q < E; q++) {
        const int32_t j = cand[q];
        w->key[j] = (drop && drop[j]) ? -INFINITY : (softmax ? cp[q] / z : cp[q]) + (c->choice_bias ? c->choice_bias[j] : 0.0);
    }
    const int grouped = G > 1 && c->top_groups < G;
    const int64_t size = grouped ? E / G : E;
    if (grouped) {
        for (int64_t g = 0; g < G; g++) {
            double first = -INFINITY, second = -INFINITY;
            int64_t alive = 0;
            for (int64_t j = g * size; j < (g + 1) * size; j++) {
                if (drop && drop[j]) continue;
                alive++;
                const double x = w->key[j];
                if (x > first) { second = first; first = x; }
                else if (x > second) second = x;
            }
            w->group_score[g] = alive >= 2 ? first + second : -INFINITY;
            w->group_count[g] = alive;
            w->taken[g] = 0;
        }
        int64_t taken = 0, held = 0;
        while (taken < G && (taken < c->top_groups || held < k)) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!w->taken[g] && (best < 0 || w->group_score[g] > w->group_score[best])) best = g;
            w->taken[best] = 1;
            taken++;
            held += w->group_count[best];
        }
    }
    /* Top-k by key among the eligible survivors, ties to the lower expert index. The candidate
     * list maps an expert back to its position. */
    double sum = 0.0;
    for (int64_t i = 0; i < k; i++) {
        int64_t best = -1;
        for (int64_t q = 0; q < E; q++) {
            const int32_t j = cand[q];
            if ((drop && drop[j]) || (grouped && !w->taken[j / size])) continue;
            int used = 0;
            for (int64_t t = 0; t < i; t++) used |= chosen[t] == q;
            if (used) continue;
            if (best < 0 || w->key[j] > w->key[cand[best]] || (w->key[j] == w->key[cand[best]] && j < cand[best]))
                best = q;
        }
        chosen[i] = best;
        weight[i] = softmax ? cp[best] / z : cp[best];
        sum += weight[i];
    }
    const double scale = c->renormalize ? c->scaling / (sum + c->norm_eps) : c->scaling;
    for (int64_t i = 0; i < k; i++) weight[i] *= scale;
}

static void rerank_scratch_free(rerank_scratch *w) {
    free(w->key); free(w->group_score); free(w->group_count); free(w->taken);
    memset(w, 0, sizeof *w);
}

static moei2_status rerank_scratch_alloc(rerank_scratch *w, int64_t E) {
    w->key = malloc((size_t)E * sizeof(double));
    w->group_score = malloc((size_t)E * sizeof(double));
    w->group_count = malloc((size_t)E * sizeof(int64_t));
    w->taken = malloc((size_t)E);
    if (!w->key || !w->group_score || !w->group_count || !w->taken) {
        rerank_scratch_free(w);
        return MOEI2_ERR_NOMEM;
    }
    return MOEI2_OK;
}

moei2_status moei2_search_prepare_rule(int64_t num_tokens, int64_t num_experts, const moei2_routing_rule *rule,
                                       int64_t num_candidates, const double *logits, int32_t *candidates,
                                       double *candidate_probs, double *probs, uint64_t *topk_bits) {
    const int64_t N = num_tokens, E = num_experts, k = rule ? rule->top_k : 0, C = num_candidates;
    if (!rule || N < 0 || k < 1 || C <= k || C > E || E > INT32_MAX) return MOEI2_ERR_ARG;
    const int reranks = moei2_rule_reranks(rule, E);
    if (reranks < 0 || (reranks && C != E)) return MOEI2_ERR_ARG;
    const int softmax = rule->weights == MOEI2_WEIGHTS_SOFTMAX;
    const int64_t W = MOEI2_MASK_WORDS(E);
    double *p = malloc((size_t)E * sizeof(double));
    double *key = malloc((size_t)E * sizeof(double));
    int64_t *chosen = malloc((size_t)k * sizeof(int64_t));
    double *weight = malloc((size_t)k * sizeof(double));
    rerank_scratch scratch = {0};
    moei2_status status = (p && key && chosen && weight) ? rerank_scratch_alloc(&scratch, E) : MOEI2_ERR_NOMEM;
    if (status != MOEI2_OK) goto done;
    /* The cache fields rerank_choose reads. */
    moei2_search_cache view = {0};
    view.num_experts = E; view.top_k = k; view.renormalize = rule->renormalize; view.scaling = rule->scaling;
    view.weights = rule->weights; view.norm_eps = rule->norm_eps; view.choice_bias = rule->choice_bias;
    view.num_groups = rule->num_groups; view.top_groups = rule->top_groups; view.window = rule->window;
    for (int64_t n = 0; n < N; n++) {
        const double *z = logits + n * E;
        int32_t *cand = candidates + n * C;
        double top = -INFINITY;
        for (int64_t j = 0; j < E; j++) {
            if (!isfinite(z[j])) { status = MOEI2_ERR_NONFINITE; goto done; }
            if (z[j] > top) top = z[j];
        }
        if (softmax) {
            double total = 0.0;
            for (int64_t j = 0; j < E; j++) {
                p[j] = exp(z[j] - top);
                total += p[j];
            }
            for (int64_t j = 0; j < E; j++) p[j] /= total;
        } else {
            for (int64_t j = 0; j < E; j++)
                p[j] = rule->weights == MOEI2_WEIGHTS_SIGMOID ? sigmoid(z[j])
                       : rule->weights == MOEI2_WEIGHTS_SPARSEMIXER ? z[j] : 1.0;
        }
        const int by_logit = rule->weights == MOEI2_WEIGHTS_UNIT || rule->weights == MOEI2_WEIGHTS_SPARSEMIXER ||
                             (softmax && !rule->choice_bias);
        for (int64_t j = 0; j < E; j++)
            key[j] = by_logit ? z[j] : p[j] + (rule->choice_bias ? rule->choice_bias[j] : 0.0);
        /* Insertion into a sorted prefix; a strict comparison keeps the lower index first on
         * equal keys, the tie rule used everywhere. */
        int64_t filled = 0;
        for (int64_t j = 0; j < E; j++) {
            if (filled == C && !(key[j] > key[cand[C - 1]])) continue;
            int64_t pos = filled < C ? filled : C - 1;
            while (pos > 0 && key[j] > key[cand[pos - 1]]) {
                cand[pos] = cand[pos - 1];
                pos--;
            }
            cand[pos] = (int32_t)j;
            if (filled < C) filled++;
        }
        for (int64_t q = 0; q < C; q++) {
            candidate_probs[n * C + q] = p[cand[q]];
            /* A zero weight would make a re-routed token's weights 0/0 (sparsemixer keeps logits). */
            if (rule->weights != MOEI2_WEIGHTS_SPARSEMIXER && !(p[cand[q]] > 0.0)) {
                status = MOEI2_ERR_NONFINITE;
                goto done;
            }
        }
        if (probs && softmax) memcpy(probs + n * E, p, (size_t)E * sizeof(double));
        uint64_t *bits = topk_bits + n * W;
        memset(bits, 0, (size_t)W * sizeof(uint64_t));
        if (reranks) {
            rerank_choose(&view, cand, candidate_probs + n * C, NULL, &scratch, chosen, weight);
            for (int64_t q = 0; q < k; q++) mask_set(bits, cand[chosen[q]]);
        } else {
            for (int64_t q = 0; q < k; q++) mask_set(bits, cand[q]);
        }
    }
done:
    free(p);
    free(key);
    free(chosen);
    free(weight);
    rerank_scratch_free(&scratch);
    return status;
}

moei2_status moei2_search_prepare(int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                  int64_t num_candidates, const double *logits, int32_t *candidates,
                                  double *candidate_probs, double *probs, uint64_t *topk_bits) {
    /* Renormalisation and scaling do not change the ranking or the scores. */
    const moei2_routing_rule rule = {MOEI2_WEIGHTS_SOFTMAX, top_k, 1, 0.0, 1.0, NULL, 1, 1, 0.0};
    return moei2_search_prepare_rule(num_tokens, num_experts, &rule, num_candidates, logits, candidates,
                                     candidate_probs, probs, topk_bits);
}

/* ---- the loss of a batch of masks ------------------------------------------------------- */

/* Shared, read-only description of the masks being scored. ids[m] lists mask m's dropped
 * experts first (drop_count[m] of them), then its kept ones: the dropped list gives P_S in r
 * loads, the kept list the surviving mass when P_S is large and 1 - P_S would lose digits.
 * dropped[m * E + j] is 1 when mask m drops expert j: one byte load per candidate tested. */
typedef struct {
    const moei2_search_cache *cache;
    const int32_t *ids;
    const int64_t *drop_count;
    const unsigned char *dropped;
    double *losses;
} loss_job;


/* Tokens are scored in blocks: the block's cache entries (about 2 KiB each) stay in cache while
 * every mask of the slice visits them, and its probabilities are transposed so that P_S of one
 * mask for the whole block is a run of contiguous, vectorisable additions. */
enum { TOKEN_BLOCK = 32 };

/* Re-routed tokens whose new top-k lies within the first FAST_WIDTH candidates (nearly all of
 * them: k + the number of experts that left) are scored on a fixed-length vector held in
 * registers, from copies of R's leading columns padded with zeros to FAST_WIDTH rows. Fixed
 * lengths make the loops branch-predictable; the zero rows add exact zeros. */
enum { FAST_WIDTH = 16 };

/* Per-slice scratch, sized by the cache. */
typedef struct {
    double *acc;      /* [masks] running sum of squares of the current calibration batch */
    double *probs_t;  /* [E, TOKEN_BLOCK] the block's probabilities, expert-major */
    double *ps;       /* [TOKEN_BLOCK] P_S of the current mask for each token of the block */
    int64_t top_len;  /* max(k, FAST_WIDTH) */
    double *top_out;  /* [TOKEN_BLOCK, top_len] R times the token's top-k probabilities, 0-padded */
    double *top_sum;  /* [TOKEN_BLOCK] A: the top-k mass when renormalising, else 1 */
    int64_t padded_cols; /* min(C, FAST_WIDTH) */
    double *padded;   /* [TOKEN_BLOCK, padded_cols, FAST_WIDTH] leading columns of R, 0-padded */
    double *coef;     /* [C] */
    double *v;        /* [C] */
    int64_t *pos_out; /* [C] candidate positions leaving the top-k */
    int64_t *pos_in;  /* [C] candidate positions entering it */
} slice_scratch;

static void scratch_free(slice_scratch *w) {
    free(w->acc); free(w->probs_t); free(w->ps); free(w->top_out); free(w->top_sum); free(w->padded);
    free(w->coef); free(w->v); free(w->pos_out); free(w->pos_in);
}

static moei2_status scratch_alloc(slice_scratch *w, int64_t M, int64_t E, int64_t k, int64_t C) {
    memset(w, 0, sizeof *w);
    w->acc = moei2_alloc(M, sizeof(double));
    w->probs_t = malloc((size_t)(E * TOKEN_BLOCK) * sizeof(double));
    w->ps = calloc((size_t)TOKEN_BLOCK, sizeof(double)); /* stays 0 when renormalising */
    w->top_len = k > FAST_WIDTH ? k : FAST_WIDTH;
    w->top_out = malloc((size_t)(w->top_len * TOKEN_BLOCK) * sizeof(double));
    w->top_sum = malloc((size_t)TOKEN_BLOCK * sizeof(double));
    w->padded_cols = C < FAST_WIDTH ? C : FAST_WIDTH;
    w->padded = malloc((size_t)(TOKEN_BLOCK * w->padded_cols * FAST_WIDTH) * sizeof(double));
    w->coef = malloc((size_t)C * sizeof(double));
    w->v = malloc((size_t)C * sizeof(double));
    w->pos_out = malloc((size_t)C * sizeof(int64_t));
    w->pos_in = malloc((size_t)C * sizeof(int64_t));
    if (!w->acc || !w->probs_t || !w->ps || !w->top_out || !w->top_sum || !w->padded || !w->coef || !w->v ||
        !w->pos_out || !w->pos_in) {
        scratch_free(w);
        return MOEI2_ERR_NOMEM;
    }
    return MOEI2_OK;
}

/* ||R c||^2 for a re-routed token, every coefficient formed directly (the general case). */
static double rerouted_norm2_direct(const double *restrict r, const double *restrict cp, const int32_t *cand,
                                    const unsigned char *drop, int64_t k, int64_t L, double stay, double out,
                                    double in, double *restrict coef, double *restrict v) {
    for (int64_t q = 0; q < L; q++) {
        const int d = drop[cand[q]];
        if (q < k) coef[q] = (d ? out : stay) * cp[q];
        else coef[q] = d ? 0.0 : in * cp[q];
    }
    for (int64_t i = 0; i < L; i++) v[i] = 0.0;
    for (int64_t j = 0; j < L; j++) {
        const double cj = coef[j];
        if (cj == 0.0) continue;
        const double *col = r + MOEI2_PACKED_SIZE(j);
        for (int64_t i = 0; i <= j; i++) v[i] += col[i] * cj;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < L; i++) sum += v[i] * v[i];
    return sum;
}

static inline void axpy(double *restrict v, const double *restrict x, int64_t n, double a) {
    for (int64_t i = 0; i < n; i++) v[i] += x[i] * a;
}

/* ||v||^2 for v = stay * a + sum over the changed candidates of their coefficient times R's
 * column, on `width` (a constant after inlining) rows held in registers. */
static inline double changed_norm2_fixed(const double *restrict padded, const double *restrict a,
                                         const double *restrict cp, const int64_t *pos_out, int64_t outs,
                                         const int64_t *pos_in, int64_t ins, double stay, double in,
                                         const int width) {
    double v[FAST_WIDTH];
    for (int i = 0; i < width; i++) v[i] = stay * a[i];
    for (int64_t j = 0; j < outs; j++) {
        const double c = -in * cp[pos_out[j]];
        const double *col = padded + pos_out[j] * FAST_WIDTH;
        for (int i = 0; i < width; i++) v[i] += col[i] * c;
    }
    for (int64_t j = 0; j < ins; j++) {
        const double c = in * cp[pos_in[j]];
        const double *col = padded + pos_in[j] * FAST_WIDTH;
        for (int i = 0; i < width; i++) v[i] += col[i] * c;
    }
    /* Two interleaved partial sums halve the dependent chain of additions. */
    double even = 0.0, odd = 0.0;
    for (int i = 0; i < width; i += 2) {
        even += v[i] * v[i];
        odd += v[i + 1] * v[i + 1];
    }
    return even + odd;
}

/* The squared error of token n under mask m; ps = P_S (unused when renormalising). */
static inline double token_error2(const moei2_search_cache *cache, const loss_job *job, slice_scratch *w,
                                  int64_t n, int64_t t, int64_t m, double ps) {
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates;
    const int renorm = cache->renormalize;
    const double s = cache->scaling;
    const int32_t *cand = cache->candidates + n * C;
    const double *cp = cache->candidate_probs + n * C;
    const unsigned char *drop = job->dropped + m * E;
    /* The original top-k experts this mask drops; branch-free, as dropping is unpredictable. */
    int64_t outs = 0;
    double lost = 0.0;
    for (int64_t q = 0; q < k; q++) {
        const int d = drop[cand[q]];
        w->pos_out[outs] = q;
        outs += d;
        lost += cp[q] * (double)d;
    }
    double zs = 1.0;
    if (!renorm && cache->weights != MOEI2_WEIGHTS_SOFTMAX) {
        /* Fixed weights: only a token that lost one of its experts changes. */
        if (!outs) return 0.0;
    } else if (!renorm) {
        if (ps <= 0.5) {
            zs = 1.0 - ps;
        } else {
            const int32_t *kept = job->ids + m * E + job->drop_count[m];
            const double *prow = cache->probs + n * E;
            zs = 0.0;
            for (int64_t i = 0; i < E - job->drop_count[m]; i++) zs += prow[kept[i]];
        }
        if (!outs) {
            const double ratio = ps / zs;
            return ratio * ratio * cache->output_norm2[n];
        }
    } else if (!outs) {
        return 0.0;
    }
    /* As many survivors past the top-k as experts left it: the candidates up to the k-th
     * survivor are the new top-k. */
    int64_t ins = 0, L = k;
    double gained = 0.0;
    while (ins < outs) {
        const int d = drop[cand[L]];
        w->pos_in[ins] = L;
        ins += !d;
        gained += cp[L] * (double)!d;
        L++;
    }
    const double A = w->top_sum[t];
    const double B = renorm ? A - lost + gained : zs;
    const double diff = renorm ? gained - lost : -ps;
    const double stay = s * diff / (A * B), in = -s / B;
    const double *r = cache->factor + n * MOEI2_PACKED_SIZE(C);
    if (!(fabs(diff) <= B))
        return rerouted_norm2_direct(r, cp, cand, drop, k, L, stay, s / A, in, w->coef, w->v);
    /* The split form of the header: stay * (R p_topk) plus the columns that changed. */
    const double *a = w->top_out + t * w->top_len;
    if (L <= FAST_WIDTH) {
        const double *padded = w->padded + t * w->padded_cols * FAST_WIDTH;
        if (L <= FAST_WIDTH / 2)
            return changed_norm2_fixed(padded, a, cp, w->pos_out, outs, w->pos_in, ins, stay, in, FAST_WIDTH / 2);
        return changed_norm2_fixed(padded, a, cp, w->pos_out, outs, w->pos_in, ins, stay, in, FAST_WIDTH);
    }
    double *restrict v = w->v;
    for (int64_t i = 0; i < k; i++) v[i] = stay * a[i];
    for (int64_t i = k; i < L; i++) v[i] = 0.0;
    for (int64_t i = 0; i < outs; i++) {
        const int64_t q = w->pos_out[i];
        axpy(v, r + MOEI2_PACKED_SIZE(q), q + 1, -in * cp[q]);
    }
    for (int64_t i = 0; i < ins; i++) {
        const int64_t q = w->pos_in[i];
        axpy(v, r + MOEI2_PACKED_SIZE(q), q + 1, in * cp[q]);
    }
    double sum = 0.0;
    for (int64_t i = 0; i < L; i++) sum += v[i] * v[i];
    return sum;
}

/* Copies R's first min(C, FAST_WIDTH) columns into FAST_WIDTH-row columns with zeros below the
 * diagonal. When C >= FAST_WIDTH every fixed-length read stays inside the token's packed R
 * (column j starts at j(j+1)/2, and (FAST_WIDTH-1) FAST_WIDTH / 2 + FAST_WIDTH = the packed size
 * of FAST_WIDTH columns), so the copy runs on fixed lengths; entries past the diagonal belong
 * to later columns and are replaced by zeros. */
static void pad_columns(const double *restrict r, int64_t C, double *restrict padded) {
    if (C >= FAST_WIDTH) {
        for (int j = 0; j < FAST_WIDTH; j++) {
            const double *col = r + MOEI2_PACKED_SIZE(j);
            double *dst = padded + j * FAST_WIDTH;
            for (int i = 0; i < FAST_WIDTH; i++) {
                const double x = col[i];
                dst[i] = i <= j ? x : 0.0;
            }
        }
        return;
    }
    memset(padded, 0, (size_t)(C * FAST_WIDTH) * sizeof(double));
    for (int64_t j = 0; j < C; j++)
        memcpy(padded + j * FAST_WIDTH, r + MOEI2_PACKED_SIZE(j), (size_t)(j + 1) * sizeof(double));
}

static moei2_status score_slice(const loss_job *job, int64_t first, int64_t last) {
    const moei2_search_cache *cache = job->cache;
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates;
    const int64_t P = MOEI2_PACKED_SIZE(C), M = last - first;
    /* Without renormalisation a softmax rule reweights every token by the surviving mass P_S. */
    const int softmax_all = !cache->renormalize && cache->weights == MOEI2_WEIGHTS_SOFTMAX;
    if (M <= 0) return MOEI2_OK;
    slice_scratch w;
    if (scratch_alloc(&w, M, E, k, C) != MOEI2_OK) return MOEI2_ERR_NOMEM;
    for (int64_t m = first; m < last; m++) job->losses[m] = 0.0;
    int64_t start = 0;
    for (int64_t b = 0; b < cache->num_batches; b++) {
        const int64_t end = cache->batch_ends[b];
        memset(w.acc, 0, (size_t)M * sizeof(double));
        for (int64_t n0 = start; n0 < end; n0 += TOKEN_BLOCK) {
            const int64_t nb = end - n0 < TOKEN_BLOCK ? end - n0 : TOKEN_BLOCK;
            for (int64_t t = 0; t < nb; t++) {
                const double *cp = cache->candidate_probs + (n0 + t) * C;
                const double *r = cache->factor + (n0 + t) * P;
                double *a = w.top_out + t * w.top_len;
                double A = 1.0;
                if (cache->renormalize) {
                    A = cache->norm_eps;
                    for (int64_t q = 0; q < k; q++) A += cp[q];
                }
                w.top_sum[t] = A;
                for (int64_t i = 0; i < w.top_len; i++) a[i] = 0.0;
                for (int64_t j = 0; j < k; j++) axpy(a, r + MOEI2_PACKED_SIZE(j), j + 1, cp[j]);
                pad_columns(r, C, w.padded + t * w.padded_cols * FAST_WIDTH);
                if (softmax_all)
                    for (int64_t j = 0; j < E; j++) w.probs_t[j * TOKEN_BLOCK + t] = cache->probs[(n0 + t) * E + j];
            }
            for (int64_t m = first; m < last; m++) {
                if (softmax_all) {
                    /* P_S summed over the dropped experts in list order, token by token. */
                    double *restrict ps = w.ps;
                    const int32_t *ids = job->ids + m * E;
                    for (int64_t t = 0; t < nb; t++) ps[t] = 0.0;
                    for (int64_t i = 0; i < job->drop_count[m]; i++) {
                        const double *restrict row = w.probs_t + (int64_t)ids[i] * TOKEN_BLOCK;
                        for (int64_t t = 0; t < nb; t++) ps[t] += row[t];
                    }
                }
                double acc = w.acc[m - first];
                for (int64_t t = 0; t < nb; t++) acc += token_error2(cache, job, &w, n0 + t, t, m, w.ps[t]);
                w.acc[m - first] = acc;
            }
        }
        for (int64_t m = first; m < last; m++) job->losses[m] += sqrt(w.acc[m - first]);
        start = end;
    }
    scratch_free(&w);
    return MOEI2_OK;
}

/* A reranking rule (C = E): each token's choice is recomputed under every mask, and its error
 * is ||R c|| with c the old minus the new weights over at most 2k candidate positions. */
static moei2_status score_slice_rerank(const loss_job *job, int64_t first, int64_t last) {
    const moei2_search_cache *cache = job->cache;
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates;
    const int64_t P = MOEI2_PACKED_SIZE(C);
    if (last <= first) return MOEI2_OK;
    rerank_scratch w = {0};
    int64_t *chosen = malloc((size_t)(2 * k) * sizeof(int64_t));
    double *weight = malloc((size_t)(2 * k) * sizeof(double));
    double *coef = calloc((size_t)C, sizeof(double));
    double *v = malloc((size_t)C * sizeof(double));
    moei2_status status = (chosen && weight && coef && v) ? rerank_scratch_alloc(&w, E) : MOEI2_ERR_NOMEM;
    if (status != MOEI2_OK) goto done;
    for (int64_t m = first; m < last; m++) job->losses[m] = 0.0;
    int64_t start = 0;
    for (int64_t b = 0; b < cache->num_batches; b++) {
        const int64_t end = cache->batch_ends[b];
        for (int64_t m = first; m < last; m++) {
            const unsigned char *drop = job->dropped + m * E;
            double acc = 0.0;
            for (int64_t n = start; n < end; n++) {
                const int32_t *cand = cache->candidates + n * C;
                const double *cp = cache->candidate_probs + n * C;
                rerank_choose(cache, cand, cp, NULL, &w, chosen, weight);
                rerank_choose(cache, cand, cp, drop, &w, chosen + k, weight + k);
                int64_t hi = 0;
                for (int64_t i = 0; i < 2 * k; i++) {
                    coef[chosen[i]] += i < k ? weight[i] : -weight[i];
                    if (chosen[i] + 1 > hi) hi = chosen[i] + 1;
                }
                for (int64_t i = 0; i < hi; i++) v[i] = 0.0;
                const double *r = cache->factor + n * P;
                for (int64_t i = 0; i < 2 * k; i++) {
                    const int64_t q = chosen[i];
                    if (coef[q] != 0.0) axpy(v, r + MOEI2_PACKED_SIZE(q), q + 1, coef[q]);
                    coef[q] = 0.0;
                }
                double sum = 0.0;
                for (int64_t i = 0; i < hi; i++) sum += v[i] * v[i];
                acc += sum;
            }
            job->losses[m] += sqrt(acc);
        }
        start = end;
    }
done:
    rerank_scratch_free(&w);
    free(chosen); free(weight); free(coef); free(v);
    return status;
}

static int score_block(void *arg, int64_t first, int64_t last) {
    const loss_job *job = (const loss_job *)arg;
    const moei2_search_cache *c = job->cache;
    const moei2_routing_rule rule = {c->weights, c->top_k, c->renormalize, c->norm_eps, c->scaling, c->choice_bias,
                                     c->num_groups, c->top_groups, c->window};
    if (moei2_rule_reranks(&rule, c->num_experts) == 1) return (int)score_slice_rerank(job, first, last);
    return (int)score_slice(job, first, last);
}

moei2_status moei2_search_loss(const moei2_search_cache *cache, const uint64_t *masks, int64_t num_masks,
                               int num_threads, double *losses) {
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates, M = num_masks;
    const int64_t W = MOEI2_MASK_WORDS(E);
    if (M < 0 || k < 1 || C <= k || C > E || cache->num_batches < 1) return MOEI2_ERR_ARG;
    const moei2_routing_rule rule = {cache->weights, k, cache->renormalize, cache->norm_eps, cache->scaling,
                                     cache->choice_bias, cache->num_groups, cache->top_groups, cache->window};
    const int reranks = moei2_rule_reranks(&rule, E);
    if (reranks < 0 || (reranks && C != E)) return MOEI2_ERR_ARG;
    if (!reranks && !cache->renormalize && cache->weights == MOEI2_WEIGHTS_SOFTMAX && cache->probs == NULL)
        return MOEI2_ERR_ARG;
    if (M == 0) return MOEI2_OK;
    int64_t ME;
    if (moei2_mul_ok(M, E, &ME)) return MOEI2_ERR_NOMEM;
    int32_t *ids = moei2_alloc(ME, sizeof(int32_t));
    int64_t *drop_count = moei2_alloc(M, sizeof(int64_t));
    unsigned char *dropped = moei2_alloc(ME, 1);
    if (!ids || !drop_count || !dropped) {
        free(ids);
        free(drop_count);
        free(dropped);
        return MOEI2_ERR_NOMEM;
    }
    moei2_status status = MOEI2_OK;
    for (int64_t m = 0; m < M; m++) {
        const uint64_t *mb = masks + m * W;
        /* Bits past E and masks dropping more than C - k experts would send the candidate walk
         * past the cached candidates. */
        if (E % 64 && (mb[W - 1] >> (E % 64))) { status = MOEI2_ERR_ARG; goto done; }
        int64_t nd = 0, nk = 0;
        const int64_t r = mask_count(mb, W);
        if (r > C - k) { status = MOEI2_ERR_ARG; goto done; }
        int32_t *row = ids + m * E;
        for (int64_t j = 0; j < E; j++) {
            const int d = mask_test(mb, j);
            dropped[m * E + j] = (unsigned char)d;
            if (d) row[nd++] = (int32_t)j;
            else row[r + nk++] = (int32_t)j;
        }
        drop_count[m] = r;
    }
    {
        /* One block per thread: each block allocates its scratch once. Each mask is summed by
         * exactly one thread in token order, so the split never changes a result. */
        loss_job job = {cache, ids, drop_count, dropped, losses};
        const int64_t threads = num_threads < 1 ? 1 : num_threads;
        const int64_t block = M / threads + (M % threads != 0);
        int err = moei2_par_for((int)threads, M, block, score_block, &job);
        if (err) status = (moei2_status)err;
    }
done:
    free(ids);
    free(drop_count);
    free(dropped);
    return status;
}
