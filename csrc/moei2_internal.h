/* Helpers shared by the kernels: the one thread launcher (parallel.c), BLAS thread pinning
 * (common.c) and overflow-checked allocation. Not part of the public C API (moei2_core.h). */
#ifndef MOEI2_INTERNAL_H
#define MOEI2_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "moei2_core.h"

/* Work on items [begin, end); returns 0 or a nonzero code (a moei2_status or a LAPACK info)
 * that par_for hands back to its caller. */
typedef int (*moei2_block_fn)(void *ctx, int64_t begin, int64_t end);

/* The thread launcher of every kernel, a spawner with no state between calls: fn over [0, total) in blocks of `block` items, taken in
 * order from a shared counter by up to `threads` threads (the caller's included). Blocks depend
 * only on total and block, never on the thread count, so a kernel whose blocks do not interact
 * gives bitwise the same result at any thread count. A thread that cannot start only costs
 * parallelism. After a block fails no new block starts; returns the first failure, else 0. */
int moei2_par_for(int threads, int64_t total, int64_t block, moei2_block_fn fn, void *ctx);

/* BLAS runs on one thread between pin and unpin, so that kernels running BLAS calls on their own
 * threads do not oversubscribe the cores. The count is process-wide, so pinning is counted: the
 * first pin saves the caller's count and the last unpin restores it, whichever threads
 * overlap. */
void moei2_blas_pin_single(void);
void moei2_blas_unpin(void);

/* malloc of count elements of size bytes, NULL when count < 0 or the byte count overflows
 * (at least one byte is allocated, so NULL always means failure). */
void *moei2_alloc(int64_t count, size_t size);
void *moei2_calloc(int64_t count, size_t size);

/* a * b into *out; 0 when it fits in int64_t with a, b >= 0, else -1. */
static inline int moei2_mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return -1;
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) return -1;
    *out = r;
    return 0;
}

#endif
