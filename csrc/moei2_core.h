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
/* (declarations of the search kernels go here) */


#ifdef __cplusplus
}
#endif

#endif
