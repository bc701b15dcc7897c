/* The thread launcher shared by every kernel, and checked allocation.
 *
 * moei2_par_for is a spawner, not a pool: each call starts its threads and joins them before it
 * returns, so no thread of moei2 outlives a kernel (nothing spins between calls, see
 * moei2/_threads.py) and this file holds no static state. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "moei2_internal.h"

/* More threads than this never pay off for these kernels and bound the stack array below. */
#define PAR_MAX_THREADS 256

typedef struct {
    moei2_block_fn fn;
    void *ctx;
    int64_t total, block, blocks;
    atomic_llong next; /* index of the next block nobody has taken */
    atomic_int err;    /* first failure reported */
} par_state;

static void *par_worker(void *arg) {
    par_state *st = (par_state *)arg;
    for (;;) {
        if (atomic_load_explicit(&st->err, memory_order_relaxed)) break;
        long long b = atomic_fetch_add(&st->next, 1);
        if (b >= st->blocks) break;
        int64_t begin = (int64_t)b * st->block;
        int64_t end = st->total - begin > st->block ? begin + st->block : st->total;
        int err = st->fn(st->ctx, begin, end);
        if (err) {
            int none = 0;
            atomic_compare_exchange_strong(&st->err, &none, err);
        }
    }
    return NULL;
}

int moei2_par_for(int threads, int64_t total, int64_t block, moei2_block_fn fn, void *ctx) {
    if (total <= 0) return 0;
    if (block < 1) block = 1;
    par_state st = {.fn = fn, .ctx = ctx, .total = total, .block = block};
    st.blocks = total / block + (total % block != 0);
    atomic_init(&st.next, 0);
    atomic_init(&st.err, 0);
    int want = threads < 1 ? 1 : threads < PAR_MAX_THREADS ? threads : PAR_MAX_THREADS;
    if ((int64_t)want > st.blocks) want = (int)st.blocks;
    pthread_t tids[PAR_MAX_THREADS];
    int started = 0;
    for (int t = 0; t < want - 1; t++) {
        if (pthread_create(&tids[t], NULL, par_worker, &st) != 0) break;
        started++;
    }
    par_worker(&st);
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    return atomic_load(&st.err);
}

/* Requests beyond this are refused without asking malloc: no machine has that memory, and some
 * allocators (and sanitizers) abort instead of returning NULL on absurd sizes. */
#define MOEI2_MAX_ALLOC ((uint64_t)1 << 46)

void *moei2_alloc(int64_t count, size_t size) {
    if (count < 0 || size == 0 || (uint64_t)count > MOEI2_MAX_ALLOC / size) return NULL;
    return malloc(count > 0 ? (size_t)count * size : 1);
}

void *moei2_calloc(int64_t count, size_t size) {
    if (count < 0 || size == 0 || (uint64_t)count > MOEI2_MAX_ALLOC / size) return NULL;
    return calloc(count > 0 ? (size_t)count : 1, size);
}
