/* Status strings, the seeded RNG and BLAS thread control shared by all kernels. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "moei2_core.h"
#include "moei2_blas.h"
#include "moei2_internal.h"

const char *moei2_status_string(moei2_status status) {
    switch (status) {
    case MOEI2_OK: return "ok";
    case MOEI2_ERR_NOMEM: return "out of memory";
    case MOEI2_ERR_ARG: return "invalid argument";
    case MOEI2_ERR_LAPACK: return "LAPACK failed to converge";
    case MOEI2_ERR_NONFINITE: return "non-finite value (NaN or Inf)";
    }
    return "unknown error";
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void moei2_rng_seed(moei2_rng *rng, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) rng->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t moei2_rng_next(moei2_rng *rng) {
    uint64_t *s = rng->s;
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

uint64_t moei2_rng_below(moei2_rng *rng, uint64_t bound) {
    /* Rejection keeps the draw exactly uniform; expected < 2 iterations. */
    uint64_t threshold = (0 - bound) % bound;
    for (;;) {
        uint64_t r = moei2_rng_next(rng);
        if (r >= threshold) return r % bound;
    }
}

double moei2_rng_uniform(moei2_rng *rng) {
    return (double)(moei2_rng_next(rng) >> 11) * 0x1.0p-53;
}

int moei2_blas_get_num_threads(void) { return BLASFN(openblas_get_num_threads)(); }
void moei2_blas_set_num_threads(int n) { BLASFN(openblas_set_num_threads)(n); }
const char *moei2_blas_config(void) { return BLASFN(openblas_get_config)(); }
const char *moei2_blas_corename(void) { return BLASFN(openblas_get_corename)(); }
int moei2_blas_num_procs(void) { return BLASFN(openblas_get_num_procs)(); }

/* The BLAS thread count is process-wide state of the library; this counter is the one piece of
 * static state in the kernels, because overlapping kernels on several caller threads must agree
 * on who restores the count (saving it per call would let a second caller save the 1 of the
 * first and restore that). */
static pthread_mutex_t pin_lock = PTHREAD_MUTEX_INITIALIZER;
static int pin_depth = 0;
static int pin_saved = 1;

void moei2_blas_pin_single(void) {
    pthread_mutex_lock(&pin_lock);
    if (pin_depth++ == 0) {
        pin_saved = moei2_blas_get_num_threads();
        if (pin_saved != 1) moei2_blas_set_num_threads(1);
    }
    pthread_mutex_unlock(&pin_lock);
}

void moei2_blas_unpin(void) {
    pthread_mutex_lock(&pin_lock);
    if (pin_depth > 0 && --pin_depth == 0 && pin_saved != 1) moei2_blas_set_num_threads(pin_saved);
    pthread_mutex_unlock(&pin_lock);
}
