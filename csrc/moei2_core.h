/* moei2 C core: the public C API of the kernels.
 *
 * Conventions shared by every kernel:
 *   - matrices are dense, row-major, with explicit sizes as int64_t;
 *   - every function returns a moei2_status; outputs are written only on MOEI2_OK;
 *   - no global or static mutable state: randomness comes from a caller-owned moei2_rng,
 *     scratch memory is allocated per call and released on every path, and threads are
 *     started per call and joined before it returns (moei2_par_for is a spawner, not a pool).
 *     The one exception is the count of kernels that pinned BLAS to one thread (common.c):
 *     it mirrors OpenBLAS's own process-wide thread count, see moei2_internal.h;
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
    MOEI2_ERR_NONFINITE = 4    /* input or intermediate contains NaN/Inf */
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

/* Element type of a weight matrix and of the factors computed from it. */
typedef enum {
    MOEI2_FLOAT32 = 0,
    MOEI2_FLOAT64 = 1
} moei2_dtype;

/* How the m x n problem is reduced to a symmetric eigenproblem of the smaller side. */
typedef enum {
    /* m <= n: eigenvectors of W G W^T (m x m), formed directly in float64. */
    MOEI2_LOWRANK_ROUTE_LEFT_GRAM = 0,
    /* m > n: W = QR (Householder), eigenvectors V of R G R^T (n x n), U = Q V. */
    MOEI2_LOWRANK_ROUTE_QR = 1
} moei2_lowrank_route;

/* Symmetric eigensolvers, tried in this order until one succeeds. */
typedef enum {
    /* dsytrd, then dsterf for every eigenvalue, dstemr (MRRR) for the top r eigenvectors only,
     * dormtr to map them back: the cheapest when r is well below the matrix size. */
    MOEI2_EIG_MRRR = 0,
    MOEI2_EIG_DIVIDE_CONQUER = 1, /* dsyevd, every eigenvector */
    MOEI2_EIG_QR_ITERATION = 2,   /* dsyev, every eigenvector: slowest, most robust */
    MOEI2_EIG_COUNT = 3
} moei2_eig_solver;

/* What moei2_lowrank_decompose found and how. */
typedef struct {
    /* sqrt of the sum of the discarded eigenvalues of W G W^T: the minimum over rank-r W' of
     * ||(W - W') X||_F for any X with X^T X = G (or ||W - W'||_F without a Gram). Each
     * discarded eigenvalue is clamped at 0 before summing. */
    double loss;
    double energy;          /* ||W X||_F = sqrt(trace(W G W^T)), so loss / energy is relative */
    double min_eigenvalue;  /* extreme eigenvalues of the reduced symmetric problem */
    double max_eigenvalue;
    moei2_lowrank_route route;
    moei2_eig_solver solver; /* the solver whose result was used */
    int whitened;            /* 0 when the plain SVD truncation was computed (no or all-zero Gram) */
    int gram_is_zero;        /* the Gram was all zeros: every rank-r W' is optimal, loss 0 */
    int indefinite;          /* W G W^T has an eigenvalue below -1e-4 of its scale: the Gram is
                              * not positive semidefinite and the result is meaningless */
    char fallback[224];      /* empty, or which solver failed and which one was used */
} moei2_lowrank_info;

/* One decomposition W (m x n, row-major) ~= A (m x r) B (r x n), minimising ||(W - AB) X||_F
 * where G = X^T X. A has orthonormal columns (U_r, ordered by decreasing eigenvalue) and
 * B = U_r^T W, so AB = U_r U_r^T W is the projection of W onto the best r-dimensional subspace
 * in the G-weighted norm. With gram == NULL (or an all-zero gram) this is the plain truncated SVD.
 * Preconditions (checked by the caller; violations give MOEI2_ERR_ARG): 1 <= rank <= min(m, n),
 * m, n <= INT32_MAX, finite inputs, a and b of the weight's dtype, gram symmetric (only its
 * values are read, never written). */
typedef struct {
    moei2_dtype dtype;
    const void *weight;      /* rows x cols */
    int64_t rows, cols;
    const double *gram;      /* cols x cols, or NULL */
    int64_t rank;
    void *a;                 /* out: rows x rank */
    void *b;                 /* out: rank x cols */
    /* Bit (1u << solver) set: skip that solver, as if it had failed. Lets tests exercise the
     * fallback chain; 0 in normal use. */
    unsigned skip_solvers;
    moei2_lowrank_info info; /* out */
    moei2_status status;     /* out: what moei2_lowrank_decompose returned */
} moei2_lowrank_job;

/* Computes one job on as many threads as the BLAS thread count set by the caller; BLAS itself runs
 * single-threaded meanwhile (the count is restored on return), and the work is split in blocks
 * that do not depend on the thread count (see lowrank.c), so the result is bitwise the one
 * decompose_many gives. Because the BLAS thread count is process-wide, do not run two calls of
 * this function concurrently from different threads: use decompose_many for that. */
moei2_status moei2_lowrank_decompose(moei2_lowrank_job *job);

/* Runs every job, one per worker, on num_threads threads (the caller's thread included; fewer
 * when there are fewer jobs). BLAS is set to one thread while the workers run and restored
 * afterwards, so the cores are not oversubscribed. Each job's own status is in job->status;
 * the return value is the first failing job's status, or MOEI2_OK. */
moei2_status moei2_lowrank_decompose_many(moei2_lowrank_job *jobs, int64_t count, int num_threads);

/* Necessary conditions for a positive semidefinite Gram, O(n^2): non-negative diagonal,
 * symmetry and |G_ij| <= sqrt(G_ii G_jj), each up to a relative 1e-3 (room for a Gram that was
 * accumulated or stored in float32). Returns 0 when they hold; otherwise 1 (negative diagonal),
 * 2 (not symmetric) or 3 (off-diagonal too large), with the offending entry in *row, *col. */
int moei2_lowrank_check_gram(const double *gram, int64_t n, int64_t *row, int64_t *col);

/* Per-expert ranks from importance, as in MoE-I2:
 *   t_j = w_j / sum(w) * R_avg * M,  w_j = ((I_j + eps) / max_k(I_k + eps))^alpha,
 *   r_j = clamp(floor(t_j), 1, cap_j),  cap_j = max(1, floor(m_j n_j / (m_j + n_j))),
 * then the budget round(R_avg * M) is met exactly: while short, +1 goes to the expert below its
 * cap with the largest t_j - r_j (on the first pass these are the largest fractional parts);
 * while over (from clamping up to 1), -1 goes to the expert above 1 with the smallest t_j - r_j.
 * Ties go to the lower index. (Dividing by the maximum leaves the shares unchanged and keeps
 * pow() away from overflow.)
 * The budget: R_avg = avg_rank, or with keep_ratio >= 0 instead (avg_rank < 0),
 * R_avg = keep_ratio * sum(m_j n_j) / sum(m_j + n_j), the average rank that keeps that fraction
 * of the dense parameters; keep_ratio = 1 gives min(that, sum(cap_j)), every parameter a
 * factorisation can hold. *budget_out and *cap_sum_out are always set when the inputs are
 * valid; MOEI2_ERR_ARG when the budget is below M (every expert needs rank 1) or above
 * sum(cap_j), or when importance, alpha, eps are negative or not finite. */
moei2_status moei2_allocate_ranks(const double *importance, const int64_t *rows, const int64_t *cols,
                                  int64_t count, double avg_rank, double keep_ratio, double alpha,
                                  double eps, int64_t *ranks, int64_t *budget_out, int64_t *cap_sum_out);


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

/* ---- routing rules beyond softmax-then-top-k ----------------------------------------------
 * A rule says how a token's weight score and choice key come from its logits (see docs/method.md,
 * "Routing rules", for each family and the proof of its candidate bound):
 *   weights SOFTMAX: softmax over the surviving experts; SIGMOID: sigmoid(z_j), which no other
 *   expert changes; UNIT: 1 (the score already scaled the expert's input, as in Llama 4);
 *   SPARSEMIXER (PhiMoE in eval mode): the k experts are picked one at a time, each the best
 *   survivor not yet picked; pick i with logit m weighs 1 / sum of exp(z_j - m) over the survivors
 *   not picked before it whose relative gap (m - z_j) / max(|z_j|, m) is at most `window` (NaN
 *   gaps count as inside): a softmax over the near-ties of the pick. No bias, groups or
 *   renormalisation.
 *   choice key: z_j for SOFTMAX without a bias, UNIT and SPARSEMIXER, else score_j + choice_bias[j].
 *   Group-limited top-k (num_groups > top_groups): equal groups of consecutive experts score the
 *   sum of their two best surviving keys (-inf below two survivors); groups are taken by score,
 *   ties to the lower group, until top_groups are taken and they hold top_k survivors; the
 *   token takes its top_k survivors of those groups by key.
 *   The k weights are divided by (their sum + norm_eps) when renormalising, then scaled.
 * When no dropped expert changes the order of the survivors' keys (no groups; no bias on a
 * softmax) the new top-k is the first k survivors in the original order, so C = k + r_max
 * candidates suffice, as for the plain rule. Otherwise ("reranking" rules) the order and the
 * chosen groups depend on the mask and every expert is a candidate: C must equal E. SPARSEMIXER
 * chooses by logit, but a pick's window can hold survivors of any rank, so it reranks too. */
typedef enum {
    MOEI2_WEIGHTS_SOFTMAX = 0,
    MOEI2_WEIGHTS_SIGMOID = 1,
    MOEI2_WEIGHTS_UNIT = 2,
    MOEI2_WEIGHTS_SPARSEMIXER = 3
} moei2_weight_fn;

typedef struct {
    moei2_weight_fn weights;
    int64_t top_k;
    int renormalize;
    double norm_eps;           /* >= 0, added to the k weights' sum before dividing */
    double scaling;            /* > 0 */
    const double *choice_bias; /* [E] finite, or NULL; not allowed with UNIT */
    int64_t num_groups;        /* <= 1: no group limit; else divides E */
    int64_t top_groups;        /* 1 <= top_groups <= num_groups when grouped */
    double window;             /* SPARSEMIXER only: >= 0, finite (PhiMoE: 2 * router_jitter_noise) */
} moei2_routing_rule;

/* 1 when the rule's ranking can change with the mask (then C must be E), 0 when it cannot,
 * -1 when the rule is invalid for E experts. */
int moei2_rule_reranks(const moei2_routing_rule *rule, int64_t num_experts);

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
    const double *output_norm2;    /* [N] ||y_n||^2, y_n the token's original routed output
                                    * (read only by a softmax rule without renormalisation) */
    /* The rest of the rule (all zero: softmax, no bias, no groups). candidate_probs then holds
     * the weight scores; probs is needed only for a softmax rule that does not renormalise and
     * does not rerank. */
    moei2_weight_fn weights;
    double norm_eps;
    const double *choice_bias;     /* [E] or NULL */
    int64_t num_groups, top_groups;
    double window;                 /* SPARSEMIXER's relative window; candidate_probs then holds logits */
} moei2_search_cache;

/* Ranks each token's experts and computes its softmax in float64 (logits [N, E], finite).
 * Writes candidates [N, C], candidate_probs [N, C], topk_bits [N, W] and, if probs is not
 * NULL, probs [N, E]. Needs 1 <= top_k < C <= E. */
moei2_status moei2_search_prepare(int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                  int64_t num_candidates, const double *logits, int32_t *candidates,
                                  double *candidate_probs, double *probs, uint64_t *topk_bits);

/* moei2_search_prepare for any rule: candidates by descending choice key (for a reranking rule
 * all E of them, C = E), candidate_probs the weight scores, topk_bits the experts the token
 * chooses with nothing dropped. probs (softmax rules only) may be NULL. */
moei2_status moei2_search_prepare_rule(int64_t num_tokens, int64_t num_experts, const moei2_routing_rule *rule,
                                       int64_t num_candidates, const double *logits, int32_t *candidates,
                                       double *candidate_probs, double *probs, uint64_t *topk_bits);

/* Factors the candidate outputs of a run of tokens: outputs [n, C, dim] (float32 or float64:
 * exactly one of outputs_f32 / outputs_f64 is non-NULL, row q = output of the token's q-th
 * candidate). Writes factor [n, C(C+1)/2] and output_norm2 [n] (the squared norm of the
 * token's original routed output, from candidate_probs [n, C]). Blocks of tokens run on
 * num_threads threads with single-threaded BLAS; each token by a Cholesky of its float64 Gram
 * when that is well conditioned, else by Householder QR (see factor.c). *qr_tokens (if not
 * NULL) receives how many took the QR route. The result does not depend on num_threads.
 * Non-finite outputs give MOEI2_ERR_NONFINITE; C * dim must stay below 2^31. */
moei2_status moei2_search_factor(int64_t num_tokens, int64_t num_candidates, int64_t dim,
                                 const float *outputs_f32, const double *outputs_f64, int64_t top_k,
                                 int renormalize, double scaling, const double *candidate_probs,
                                 double *factor, double *output_norm2, int num_threads,
                                 int64_t *qr_tokens);

/* The candidate outputs of a run of tokens through SiLU-gated experts, in float32:
 * outputs[t, q] = down_e (silu(gate_e x_t) * up_e x_t), e = candidates[t, q], with
 * gate_up [E, 2I, H] (gate rows first), down [E, H, I] row-major, x [n, H]. */
typedef struct {
    int64_t num_tokens;        /* n */
    int64_t num_candidates;    /* C */
    int64_t num_experts;       /* E */
    int64_t hidden;            /* H */
    int64_t inter;             /* I */
    const float *x;            /* [n, H] */
    const int32_t *candidates; /* [n, C] expert ids in [0, E) */
    const float *gate_up;      /* [E, 2I, H] */
    const float *down;         /* [E, H, I] */
    float *outputs;            /* out: [n, C, H] */
} moei2_expert_outputs_job;

/* Experts run as independent blocks on num_threads threads (single-threaded BLAS), each in
 * fixed row panels: the result does not depend on num_threads. */
moei2_status moei2_candidate_outputs(const moei2_expert_outputs_job *job, int num_threads);

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
