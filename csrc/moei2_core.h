/* moei2 C core: the public C API of the kernels.
 *
 * Conventions shared by every kernel:
 *   - matrices are dense, row-major, with explicit sizes as int64_t;
 *   - every function returns a moei2_status; outputs are written only on MOEI2_OK;
 *   - no global or static mutable state: randomness comes from a caller-owned moei2_rng,
 *     scratch memory is allocated per call and released on every path;
 *   - kernels never print; the caller turns a status into an error message
 *     (moei2_status_string).
 * This header knows nothing of Python. */
#ifndef MOEI2_CORE_H
#define MOEI2_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MOEI2_OK = 0,
    MOEI2_ERR_NOMEM = 1,       /* an allocation failed */
    MOEI2_ERR_ARG = 2,         /* an argument is out of range (the glue checks first) */
    MOEI2_ERR_LAPACK = 3,      /* LAPACK reported failure and no fallback succeeded */
    MOEI2_ERR_NONFINITE = 4,   /* input or intermediate contains NaN/Inf */
    MOEI2_ERR_THREAD = 5       /* a worker thread could not be started */
} moei2_status;

const char *moei2_status_string(moei2_status status);

/* ---- random numbers (xoshiro256**, seeded by splitmix64) ------------------------------ */
typedef struct {
    uint64_t s[4];
} moei2_rng;

void moei2_rng_seed(moei2_rng *rng, uint64_t seed);
uint64_t moei2_rng_next(moei2_rng *rng);
/* uniform integer in [0, bound), bound > 0, without modulo bias */
uint64_t moei2_rng_below(moei2_rng *rng, uint64_t bound);
/* uniform double in [0, 1) */
double moei2_rng_uniform(moei2_rng *rng);

/* ---- BLAS threading ----------------------------------------------------------------- */
int moei2_blas_get_num_threads(void);
void moei2_blas_set_num_threads(int n);
const char *moei2_blas_config(void);
const char *moei2_blas_corename(void);
int moei2_blas_num_procs(void);

/* ==== lowrank.c: truncation-aware low-rank decomposition and rank allocation ========== */
/* (declarations of lowrank.c go here) */


/* ==== importance.c / fitness.c / genetic.c: inter-expert pruning ===================== */
/*
 * Routing under pruning (the one rule used everywhere): the logits of dropped experts become
 * -inf, the softmax runs over the survivors, the token takes its top-k survivors, the k weights
 * are optionally divided by their sum (renormalise), then multiplied by a scaling factor.
 *
 * A token can only be re-routed among its top-(k + r) experts by router score when r experts
 * are dropped, so a layer's search cache keeps, per token, only its C = k + r_max best
 * "candidate" experts. Instead of their output vectors it keeps R, the upper-triangular factor
 * of a QR decomposition of the d x C matrix of candidate outputs: R^T R is their Gram matrix, so
 * the re-routing error d = sum_q c_q o_q has ||d|| = ||R c|| exactly, computed as a sum of
 * squares (no cancellation) from C(C+1)/2 numbers instead of C*d.
 *
 * Candidates are ranked by descending router logit, ties to the lower expert index; the same
 * order decides top-k ties everywhere. Masks are bitsets of W = ceil(E/64) words, bit j set when
 * expert j is dropped.
 *
 * L(S) = sum over calibration batches b of ||Y_b - Y_b,S||_F, accumulated in float64.
 */

/* Number of doubles in one token's packed factor: column j of R holds rows 0..j. */
#define MOEI2_PACKED_SIZE(c) ((c) * ((c) + 1) / 2)
#define MOEI2_MASK_WORDS(e) (((e) + 63) / 64)

/* Per-token routing data of a layer. probs (the softmax over ALL experts) is needed only when
 * the model does not renormalise, since then dropping any expert shrinks the softmax
 * denominator of every token; it is NULL otherwise. */
typedef struct {
    int64_t num_tokens;            /* N */
    int64_t num_experts;           /* E */
    int64_t top_k;                 /* k */
    int64_t num_candidates;        /* C = k + r_max, k < C <= E */
    int renormalize;               /* divide the k weights by their sum */
    double scaling;                /* multiplies every routing weight */
    int64_t num_batches;           /* calibration batches */
    const int64_t *batch_ends;     /* [num_batches], strictly increasing, last = N */
    const int32_t *candidates;     /* [N, C] expert ids by descending logit */
    const double *candidate_probs; /* [N, C] softmax probability of each candidate */
    const double *probs;           /* [N, E] softmax over all experts, or NULL if renormalize */
    const uint64_t *topk_bits;     /* [N, W] the token's original top-k as a bitset */
    const double *factor;          /* [N, C(C+1)/2] packed R of each token */
    const double *output_norm2;    /* [N] ||y_n||^2, y_n the token's original routed output */
} moei2_search_cache;

/* Ranks each token's experts and computes its softmax in float64 (logits [N, E], finite).
 * Writes candidates [N, C], candidate_probs [N, C], topk_bits [N, W] and, if probs is not
 * NULL, probs [N, E]. Needs 1 <= top_k < C <= E. */
moei2_status moei2_search_prepare(int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                  int64_t num_candidates, const double *logits, int32_t *candidates,
                                  double *candidate_probs, double *probs, uint64_t *topk_bits);

/* Factors the candidate outputs of a run of tokens: outputs [n, C, dim] (float32 or float64:
 * exactly one of outputs_f32 / outputs_f64 is non-NULL, row q = output of the token's q-th
 * candidate). Writes factor [n, C(C+1)/2] and output_norm2 [n] (the squared norm of the
 * token's original routed output, from candidate_probs [n, C]). Non-finite outputs give
 * MOEI2_ERR_NONFINITE. */
moei2_status moei2_search_factor(int64_t num_tokens, int64_t num_candidates, int64_t dim,
                                 const float *outputs_f32, const double *outputs_f64, int64_t top_k,
                                 int renormalize, double scaling, const double *candidate_probs,
                                 double *factor, double *output_norm2);

/* L(S) for a batch of masks [num_masks, W]. Every mask must drop at most C - k experts (and so
 * at most E - k); masks may differ in size. Threads split the masks, so each mask's sum runs in
 * the same order whatever num_threads is: results are bitwise reproducible. */
moei2_status moei2_search_loss(const moei2_search_cache *cache, const uint64_t *masks, int64_t num_masks,
                               int num_threads, double *losses);

/* importance[j] = L({j}) for every expert j. Needs C > k (r_max >= 1) and E > k. */
moei2_status moei2_search_expert_importance(const moei2_search_cache *cache, int num_threads,
                                            double *importance);

/* Greedy removal: r times, drop the expert whose addition to the dropped set costs least
 * (ties to the lower index), re-scoring every remaining expert at each step. Writes the final
 * mask [W], step_best[i] (the loss after step i), step_mean[i] (the mean over the experts tried
 * at step i) and the number of masks scored. */
moei2_status moei2_search_greedy(const moei2_search_cache *cache, int64_t drop_count, int num_threads,
                                 uint64_t *mask, double *step_best, double *step_mean,
                                 int64_t *evaluations);

/* The outcome of a subset search: the best distinct masks (sorted by loss, ties by the
 * lexicographic order of the dropped index lists) and, for the genetic search, the best and
 * mean loss of each generation's population. Caller-owned arrays: masks [k_best, W],
 * losses [k_best], history_best / history_mean [generations] (may be NULL for exhaustive). */
typedef struct {
    uint64_t *masks;
    double *losses;
    int64_t found;           /* masks written: min(k_best, distinct masks evaluated) */
    double *history_best;
    double *history_mean;
    int64_t history_length;  /* generations recorded (fewer when the space is exhausted) */
    int64_t evaluations;     /* distinct masks scored */
} moei2_search_result;

typedef struct {
    int64_t drop_count;      /* r: every mask drops exactly r experts, 0 <= r <= C - k */
    int64_t population;      /* >= 2; capped at the number of r-subsets */
    int64_t generations;     /* >= 1, counting the random initial population */
    int64_t elite_count;     /* 1 <= elite_count <= population: parents kept each generation */
    double mutation_rate;    /* in [0, 1]: probability of swapping each dropped slot */
    int64_t k_best;          /* >= 1 */
    int num_threads;         /* fitness threads; the result does not depend on it */
} moei2_genetic_params;

/* Number of r-subsets of E experts, saturating at UINT64_MAX. */
uint64_t moei2_combinations(int64_t n, int64_t r);

/* Every r-subset, in lexicographic order, scored in batches; keeps the k_best. */
moei2_status moei2_search_exhaustive(const moei2_search_cache *cache, int64_t drop_count, int64_t k_best,
                                     int num_threads, moei2_search_result *result);

/* The layer-wise genetic search (docs/method.md, stage 1b) with randomness from rng only.
 * Returns the k_best distinct masks among all evaluated. */
moei2_status moei2_search_genetic(const moei2_search_cache *cache, const moei2_genetic_params *params,
                                  moei2_rng *rng, moei2_search_result *result);


#ifdef __cplusplus
}
#endif

#endif
