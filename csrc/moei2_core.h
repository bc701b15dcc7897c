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
 * of the dense parameters. *budget_out and *cap_sum_out are always set when the inputs are
 * valid; MOEI2_ERR_ARG when the budget is below M (every expert needs rank 1) or above
 * sum(cap_j), or when importance, alpha, eps are negative or not finite. */
moei2_status moei2_allocate_ranks(const double *importance, const int64_t *rows, const int64_t *cols,
                                  int64_t count, double avg_rank, double keep_ratio, double alpha,
                                  double eps, int64_t *ranks, int64_t *budget_out, int64_t *cap_sum_out);


/* ==== importance.c / fitness.c / genetic.c: inter-expert pruning ===================== */
/* (declarations of the search kernels go here) */


#ifdef __cplusplus
}
#endif

#endif
