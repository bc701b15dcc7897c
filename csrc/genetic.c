/* Subset searches over the masks of one layer: exhaustive enumeration (the NAEE baseline and
 * the ground truth on small layers) and the layer-wise genetic search of docs/method.md.
 *
 * Both score masks in batches through moei2_search_loss, whose per-mask sums do not depend on
 * the thread count, and all randomness is drawn on the calling thread from the caller's rng:
 * the same seed gives the same result whatever num_threads is. */
#include <stdlib.h>
#include <string.h>

#include "moei2_core.h"
#include "moei2_internal.h"
#include "search_internal.h"

uint64_t moei2_combinations(int64_t n, int64_t r) {
    if (r < 0 || n < 0 || r > n) return 0;
    if (r > n - r) r = n - r;
    uint64_t c = 1;
    for (int64_t i = 1; i <= r; i++) {
        /* c * (n - r + i) / i stays exact: c is C(n-r+i-1, i-1), and the product of i
         * consecutive integers is divisible by i!. Divide first where possible to delay
         * overflow, and saturate when it cannot be avoided. */
        uint64_t num = (uint64_t)(n - r + i), den = (uint64_t)i;
        uint64_t g = c, h = den;
        while (h) { uint64_t t = g % h; g = h; h = t; }
        uint64_t c_red = c / g, den_red = den / g;
        if (num % den_red != 0) {
            /* den_red divides c_red * num and is coprime with c_red. */
            return UINT64_MAX;
        }
        uint64_t num_red = num / den_red;
        if (c_red != 0 && num_red > UINT64_MAX / c_red) return UINT64_MAX;
        c = c_red * num_red;
    }
    return c;
}

/* ---- exhaustive enumeration ------------------------------------------------------------- */

enum { SCORE_BATCH = 2048 };

static moei2_status check_drop_count(const moei2_search_cache *cache, int64_t r) {
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates;
    if (r < 0 || r > C - k || r > E - k) return MOEI2_ERR_ARG;
    return MOEI2_OK;
}

moei2_status moei2_search_exhaustive(const moei2_search_cache *cache, int64_t drop_count, int64_t k_best,
                                     int num_threads, moei2_search_result *result) {
    const int64_t E = cache->num_experts, W = MOEI2_MASK_WORDS(E), r = drop_count;
    if (check_drop_count(cache, r) != MOEI2_OK || k_best < 1) return MOEI2_ERR_ARG;
    uint64_t *batch = malloc((size_t)(SCORE_BATCH * W) * sizeof(uint64_t));
    double *loss = malloc((size_t)SCORE_BATCH * sizeof(double));
    int64_t *idx = malloc((size_t)(r > 0 ? r : 1) * sizeof(int64_t));
    best_list best = {k_best, 0, W, result->losses, result->masks};
    moei2_status status = MOEI2_OK;
    int64_t evaluated = 0;
    if (!batch || !loss || !idx) { status = MOEI2_ERR_NOMEM; goto done; }
    for (int64_t i = 0; i < r; i++) idx[i] = i;
    int more = 1;
    while (more) {
        int64_t count = 0;
        while (more && count < SCORE_BATCH) {
            mask_from_indices(batch + count * W, W, idx, r);
            count++;
            more = next_combination(idx, r, E);
        }
        status = moei2_search_loss(cache, batch, count, num_threads, loss);
        if (status != MOEI2_OK) goto done;
        for (int64_t i = 0; i < count; i++) best_list_offer(&best, loss[i], batch + i * W);
        evaluated += count;
    }
    result->found = best.size;
    result->history_length = 0;
    result->evaluations = evaluated;
done:
    free(batch);
    free(loss);
    free(idx);
    return status;
}

/* ---- memo: every mask scored so far, with its loss -------------------------------------- */

typedef struct {
    int64_t words;
    int64_t size, capacity;  /* entries */
    uint64_t *masks;         /* [capacity, words] */
    double *losses;          /* [capacity] */
    int64_t *table;          /* open addressing, -1 = empty */
    int64_t table_size;      /* power of two, >= 2 * capacity */
} mask_memo;

static uint64_t mask_hash(const uint64_t *mask, int64_t words) {
    uint64_t h = 0x9E3779B97F4A7C15ULL;
    for (int64_t w = 0; w < words; w++) {
        h ^= mask[w] + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
    }
    return h;
}

/* The smallest power of two >= 2 * capacity (at least 16), or -1 when that overflows. */
static int64_t memo_table_size(int64_t capacity) {
    int64_t size = 16;
    if (capacity > INT64_MAX / 4) return -1;
    while (size < 2 * capacity) size *= 2;
    return size;
}

static moei2_status memo_init(mask_memo *memo, int64_t words, int64_t capacity) {
    memset(memo, 0, sizeof *memo);
    int64_t entries;
    memo->words = words;
    memo->capacity = capacity;
    memo->table_size = memo_table_size(capacity);
    if (memo->table_size < 0 || moei2_mul_ok(capacity, words, &entries)) return MOEI2_ERR_NOMEM;
    memo->masks = moei2_alloc(entries, sizeof(uint64_t));
    memo->losses = moei2_alloc(capacity, sizeof(double));
    memo->table = moei2_alloc(memo->table_size, sizeof(int64_t));
    if (!memo->masks || !memo->losses || !memo->table) return MOEI2_ERR_NOMEM;
    for (int64_t i = 0; i < memo->table_size; i++) memo->table[i] = -1;
    return MOEI2_OK;
}

static void memo_free(mask_memo *memo) {
    free(memo->masks);
    free(memo->losses);
    free(memo->table);
}

/* Index of mask in the memo, or -1. */
static int64_t memo_find(const mask_memo *memo, const uint64_t *mask) {
    const int64_t W = memo->words;
    uint64_t slot = mask_hash(mask, W) & (uint64_t)(memo->table_size - 1);
    for (;;) {
        int64_t e = memo->table[slot];
        if (e < 0) return -1;
        if (memcmp(memo->masks + e * W, mask, (size_t)W * sizeof(uint64_t)) == 0) return e;
        slot = (slot + 1) & (uint64_t)(memo->table_size - 1);
    }
}

static moei2_status memo_grow(mask_memo *memo) {
    const int64_t W = memo->words;
    int64_t capacity, entries;
    if (moei2_mul_ok(memo->capacity, 2, &capacity) || moei2_mul_ok(capacity, W, &entries) ||
        (uint64_t)entries > SIZE_MAX / sizeof(uint64_t))
        return MOEI2_ERR_NOMEM;
    const int64_t table_size = memo_table_size(capacity);
    if (table_size < 0 || (uint64_t)table_size > SIZE_MAX / sizeof(int64_t)) return MOEI2_ERR_NOMEM;
    uint64_t *masks = realloc(memo->masks, (size_t)entries * sizeof(uint64_t));
    if (!masks) return MOEI2_ERR_NOMEM;
    memo->masks = masks;
    double *losses = realloc(memo->losses, (size_t)capacity * sizeof(double));
    if (!losses) return MOEI2_ERR_NOMEM;
    memo->losses = losses;
    int64_t *table = moei2_alloc(table_size, sizeof(int64_t));
    if (!table) return MOEI2_ERR_NOMEM;
    for (int64_t i = 0; i < table_size; i++) table[i] = -1;
    for (int64_t e = 0; e < memo->size; e++) {
        uint64_t slot = mask_hash(memo->masks + e * W, W) & (uint64_t)(table_size - 1);
        while (table[slot] >= 0) slot = (slot + 1) & (uint64_t)(table_size - 1);
        table[slot] = e;
    }
    free(memo->table);
    memo->table = table;
    memo->table_size = table_size;
    memo->capacity = capacity;
    return MOEI2_OK;
}

/* Appends a mask known to be absent; returns its index or -1 when out of memory. */
static int64_t memo_insert(mask_memo *memo, const uint64_t *mask, double loss) {
    const int64_t W = memo->words;
    if (memo->size == memo->capacity && memo_grow(memo) != MOEI2_OK) return -1;
    int64_t e = memo->size++;
    memcpy(memo->masks + e * W, mask, (size_t)W * sizeof(uint64_t));
    memo->losses[e] = loss;
    uint64_t slot = mask_hash(mask, W) & (uint64_t)(memo->table_size - 1);
    while (memo->table[slot] >= 0) slot = (slot + 1) & (uint64_t)(memo->table_size - 1);
    memo->table[slot] = e;
    return e;
}

/* ---- the genetic search ----------------------------------------------------------------- */

/* Scratch shared by the operators. The population is a list of memo indices for scored
 * members; members born this generation and not yet scored sit in `pending`. */
typedef struct {
    const moei2_search_cache *cache;
    int64_t E, W, r;
    moei2_rng *rng;
    int64_t *perm;      /* [E] scratch for sampling */
    int64_t *dropped;   /* [E] */
    int64_t *kept;      /* [E] */
    uint64_t *pending;  /* [population, W] new masks awaiting a score */
    int64_t pending_count;
    int64_t *members;   /* [population] memo index, or -(1 + pending index) */
    int64_t member_count;
    mask_memo memo;
} ga_state;

static const uint64_t *member_mask(const ga_state *s, int64_t i) {
    int64_t e = s->members[i];
    return e >= 0 ? s->memo.masks + e * s->W : s->pending + (-1 - e) * s->W;
}

static int in_population(const ga_state *s, const uint64_t *mask) {
    for (int64_t i = 0; i < s->member_count; i++)
        if (memcmp(member_mask(s, i), mask, (size_t)s->W * sizeof(uint64_t)) == 0) return 1;
    return 0;
}

/* Adds mask to the population (it must not be there yet): a memo hit reuses its loss. */
static void add_member(ga_state *s, const uint64_t *mask) {
    int64_t e = memo_find(&s->memo, mask);
    if (e >= 0) {
        s->members[s->member_count++] = e;
    } else {
        memcpy(s->pending + s->pending_count * s->W, mask, (size_t)s->W * sizeof(uint64_t));
        s->members[s->member_count++] = -1 - s->pending_count;
        s->pending_count++;
    }
}

/* Draws `take` distinct items of pool[0..size) into out via a partial Fisher-Yates shuffle
 * (pool is permuted in place). */
static void sample_into(moei2_rng *rng, int64_t *pool, int64_t size, int64_t take, int64_t *out) {
    for (int64_t i = 0; i < take; i++) {
        int64_t j = i + (int64_t)moei2_rng_below(rng, (uint64_t)(size - i));
        int64_t t = pool[i]; pool[i] = pool[j]; pool[j] = t;
        out[i] = pool[i];
    }
}

static void random_mask(ga_state *s, uint64_t *mask) {
    for (int64_t j = 0; j < s->E; j++) s->perm[j] = j;
    sample_into(s->rng, s->perm, s->E, s->r, s->dropped);
    mask_from_indices(mask, s->W, s->dropped, s->r);
}

/* Crossover then mutation of parents a and b into child. */
static void make_child(ga_state *s, const uint64_t *a, const uint64_t *b, double mutation_rate, uint64_t *child) {
    const int64_t E = s->E, W = s->W, r = s->r;
    /* Crossover: a random r-subset of the union, topped up from outside it if too small. */
    int64_t in_union = 0, outside = 0;
    for (int64_t j = 0; j < E; j++) {
        if (mask_test(a, j) || mask_test(b, j)) s->perm[in_union++] = j;
        else s->kept[outside++] = j;
    }
    memset(child, 0, (size_t)W * sizeof(uint64_t));
    if (in_union >= r) {
        sample_into(s->rng, s->perm, in_union, r, s->dropped);
    } else {
        for (int64_t i = 0; i < in_union; i++) s->dropped[i] = s->perm[i];
        sample_into(s->rng, s->kept, outside, r - in_union, s->dropped + in_union);
    }
    /* Mutation: each dropped slot is swapped for a kept expert with probability mutation_rate,
     * and at least one slot always is, so a child never merely copies its crossover. */
    int64_t nk = 0;
    int64_t *dropped = s->dropped;
    for (int64_t i = 0; i < r; i++) mask_set(child, dropped[i]);
    for (int64_t j = 0; j < E; j++)
        if (!mask_test(child, j)) s->kept[nk++] = j;
    int swapped = 0;
    for (int64_t i = 0; i < r; i++) {
        if (moei2_rng_uniform(s->rng) < mutation_rate) {
            int64_t u = (int64_t)moei2_rng_below(s->rng, (uint64_t)nk);
            int64_t t = dropped[i]; dropped[i] = s->kept[u]; s->kept[u] = t;
            swapped = 1;
        }
    }
    if (!swapped && nk > 0 && r > 0) {
        int64_t i = (int64_t)moei2_rng_below(s->rng, (uint64_t)r);
        int64_t u = (int64_t)moei2_rng_below(s->rng, (uint64_t)nk);
        int64_t t = dropped[i]; dropped[i] = s->kept[u]; s->kept[u] = t;
    }
    mask_from_indices(child, W, dropped, r);
}

/* First r-subset in lexicographic order that is not in the population; 0 if none. Only used
 * when random draws keep colliding, i.e. when the space is barely larger than the population. */
static int first_absent_mask(ga_state *s, uint64_t *mask) {
    for (int64_t i = 0; i < s->r; i++) s->dropped[i] = i;
    do {
        mask_from_indices(mask, s->W, s->dropped, s->r);
        if (!in_population(s, mask)) return 1;
    } while (next_combination(s->dropped, s->r, s->E));
    return 0;
}

/* A mask not yet in the population: random draws first, the lexicographic walk when they keep
 * colliding. Returns 0 when every r-subset is already a member. */
static int absent_random_mask(ga_state *s, uint64_t *mask) {
    enum { RANDOM_TRIES = 64 };
    for (int t = 0; t < RANDOM_TRIES; t++) {
        random_mask(s, mask);
        if (!in_population(s, mask)) return 1;
    }
    return first_absent_mask(s, mask);
}

/* Scores the pending members and turns them into memo entries. */
static moei2_status score_pending(ga_state *s, int num_threads, double *scratch) {
    if (s->pending_count == 0) return MOEI2_OK;
    moei2_status status = moei2_search_loss(s->cache, s->pending, s->pending_count, num_threads, scratch);
    if (status != MOEI2_OK) return status;
    for (int64_t i = 0; i < s->member_count; i++) {
        if (s->members[i] >= 0) continue;
        int64_t p = -1 - s->members[i];
        int64_t e = memo_insert(&s->memo, s->pending + p * s->W, scratch[p]);
        if (e < 0) return MOEI2_ERR_NOMEM;
        s->members[i] = e;
    }
    s->pending_count = 0;
    return MOEI2_OK;
}

typedef struct {
    double loss;
    const uint64_t *mask;
    int64_t words;
    int64_t entry;
} ranked_member;

static int ranked_compare(const void *pa, const void *pb) {
    const ranked_member *a = pa, *b = pb;
    return result_compare(a->loss, a->mask, b->loss, b->mask, a->words);
}

moei2_status moei2_search_genetic(const moei2_search_cache *cache, const moei2_genetic_params *params,
                                  moei2_rng *rng, moei2_search_result *result) {
    const int64_t E = cache->num_experts, W = MOEI2_MASK_WORDS(E), r = params->drop_count;
    if (check_drop_count(cache, r) != MOEI2_OK || params->population < 2 || params->generations < 1 ||
        params->elite_count < 1 || params->elite_count > params->population || params->k_best < 1 ||
        !(params->mutation_rate >= 0.0 && params->mutation_rate <= 1.0))
        return MOEI2_ERR_ARG;
    const uint64_t total = moei2_combinations(E, r);
    const int64_t P = (uint64_t)params->population < total ? params->population : (int64_t)total;
    const int64_t elite = params->elite_count < P ? params->elite_count : P;
    const int num_threads = params->num_threads;

    ga_state s;
    memset(&s, 0, sizeof s);
    s.cache = cache;
    s.E = E;
    s.W = W;
    s.r = r;
    s.rng = rng;
    moei2_status status = MOEI2_OK;
    /* Every size below is checked: a population near 2^61 must give MOEI2_ERR_NOMEM, not a
     * wrapped size and a short buffer. */
    int64_t pw = -1, memo_capacity = -1;
    if (moei2_mul_ok(P, W, &pw) || moei2_mul_ok(P, 4, &memo_capacity)) pw = memo_capacity = -1;
    double *scratch = moei2_alloc(P, sizeof(double));
    uint64_t *child = moei2_alloc(W, sizeof(uint64_t));
    ranked_member *ranked = moei2_alloc(P, sizeof(ranked_member));
    int64_t *parents = moei2_alloc(P, sizeof(int64_t));
    s.perm = moei2_alloc(E, sizeof(int64_t));
    s.dropped = moei2_alloc(E, sizeof(int64_t));
    s.kept = moei2_alloc(E, sizeof(int64_t));
    s.pending = moei2_alloc(pw, sizeof(uint64_t));
    s.members = moei2_alloc(P, sizeof(int64_t));
    if (memo_capacity < 0 || memo_init(&s.memo, W, memo_capacity) != MOEI2_OK || !scratch || !child || !ranked ||
        !parents || !s.perm ||
        !s.dropped || !s.kept || !s.pending || !s.members) {
        status = MOEI2_ERR_NOMEM;
        goto done;
    }
    enum { CROSSOVER_TRIES = 64 };

    /* Generation 0: P distinct random masks. */
    while (s.member_count < P) {
        if (!absent_random_mask(&s, child)) break;
        add_member(&s, child);
    }
    int64_t generation = 0;
    for (;;) {
        status = score_pending(&s, num_threads, scratch);
        if (status != MOEI2_OK) goto done;
        for (int64_t i = 0; i < s.member_count; i++) {
            int64_t e = s.members[i];
            ranked[i] = (ranked_member){s.memo.losses[e], s.memo.masks + e * W, W, e};
        }
        qsort(ranked, (size_t)s.member_count, sizeof(ranked_member), ranked_compare);
        double sum = 0.0;
        for (int64_t i = 0; i < s.member_count; i++) sum += ranked[i].loss;
        if (result->history_best) result->history_best[generation] = ranked[0].loss;
        if (result->history_mean) result->history_mean[generation] = sum / (double)s.member_count;
        generation++;
        /* Stop after the last generation, or once every mask has been scored. */
        if (generation >= params->generations || (uint64_t)s.memo.size >= total) break;

        /* Elitist truncation: the best `elite` members survive and are the only parents. */
        const int64_t parent_count = elite < s.member_count ? elite : s.member_count;
        for (int64_t i = 0; i < parent_count; i++) parents[i] = ranked[i].entry;
        s.member_count = 0;
        for (int64_t i = 0; i < parent_count; i++) s.members[s.member_count++] = parents[i];
        while (s.member_count < P) {
            int found = 0;
            for (int t = 0; t < CROSSOVER_TRIES && !found; t++) {
                int64_t ia = (int64_t)moei2_rng_below(rng, (uint64_t)parent_count);
                int64_t ib = ia;
                if (parent_count > 1) {
                    ib = (int64_t)moei2_rng_below(rng, (uint64_t)(parent_count - 1));
                    if (ib >= ia) ib++;
                }
                make_child(&s, s.memo.masks + parents[ia] * W, s.memo.masks + parents[ib] * W,
                           params->mutation_rate, child);
                found = !in_population(&s, child);
            }
            if (!found) found = absent_random_mask(&s, child);
            if (!found) break;
            add_member(&s, child);
        }
    }
    result->history_length = generation;
    {
        best_list best = {params->k_best, 0, W, result->losses, result->masks};
        for (int64_t e = 0; e < s.memo.size; e++) best_list_offer(&best, s.memo.losses[e], s.memo.masks + e * W);
        result->found = best.size;
    }
    result->evaluations = s.memo.size;
done:
    memo_free(&s.memo);
    free(scratch);
    free(child);
    free(ranked);
    free(parents);
    free(s.perm);
    free(s.dropped);
    free(s.kept);
    free(s.pending);
    free(s.members);
    return status;
}
