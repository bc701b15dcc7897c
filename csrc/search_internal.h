/* Helpers shared by the search kernels (fitness.c, importance.c, genetic.c): mask bitsets and
 * the total order of search results. Not part of the public C API. */
#ifndef MOEI2_SEARCH_INTERNAL_H
#define MOEI2_SEARCH_INTERNAL_H

#include <stdint.h>
#include <string.h>

#include "moei2_core.h"

static inline int mask_test(const uint64_t *mask, int64_t j) { return (int)((mask[j >> 6] >> (j & 63)) & 1u); }
static inline void mask_set(uint64_t *mask, int64_t j) { mask[j >> 6] |= (uint64_t)1 << (j & 63); }

static inline int64_t mask_count(const uint64_t *mask, int64_t words) {
    int64_t n = 0;
    for (int64_t w = 0; w < words; w++) n += __builtin_popcountll(mask[w]);
    return n;
}

/* Orders masks of equal size like their sorted dropped-index lists (itertools.combinations
 * order): the mask holding the lowest index on which the two differ comes first. */
static inline int mask_lex_compare(const uint64_t *a, const uint64_t *b, int64_t words) {
    for (int64_t w = 0; w < words; w++) {
        uint64_t x = a[w] ^ b[w];
        if (x) {
            uint64_t low = x & (0 - x);
            return (a[w] & low) ? -1 : 1;
        }
    }
    return 0;
}

/* Results are ranked by loss, ties broken by mask order, so every search is deterministic. */
static inline int result_compare(double loss_a, const uint64_t *a, double loss_b, const uint64_t *b,
                                 int64_t words) {
    if (loss_a < loss_b) return -1;
    if (loss_a > loss_b) return 1;
    return mask_lex_compare(a, b, words);
}

/* A bounded list of the best (loss, mask) pairs seen so far, kept sorted; capacity is small
 * (the K best), so insertion is a linear shift. */
typedef struct {
    int64_t capacity, size, words;
    double *losses;   /* [capacity] */
    uint64_t *masks;  /* [capacity, words] */
} best_list;

static inline void best_list_offer(best_list *list, double loss, const uint64_t *mask) {
    int64_t pos = list->size;
    while (pos > 0 && result_compare(loss, mask, list->losses[pos - 1], list->masks + (pos - 1) * list->words,
                                     list->words) < 0)
        pos--;
    if (pos >= list->capacity) return;
    int64_t last = list->size < list->capacity ? list->size : list->capacity - 1;
    for (int64_t i = last; i > pos; i--) {
        list->losses[i] = list->losses[i - 1];
        memcpy(list->masks + i * list->words, list->masks + (i - 1) * list->words,
               (size_t)list->words * sizeof(uint64_t));
    }
    list->losses[pos] = loss;
    memcpy(list->masks + pos * list->words, mask, (size_t)list->words * sizeof(uint64_t));
    if (list->size < list->capacity) list->size++;
}

/* Steps a sorted r-subset of {0..n-1} to its lexicographic successor; 0 after the last. */
static inline int next_combination(int64_t *idx, int64_t r, int64_t n) {
    int64_t i = r - 1;
    while (i >= 0 && idx[i] == n - r + i) i--;
    if (i < 0) return 0;
    idx[i]++;
    for (int64_t j = i + 1; j < r; j++) idx[j] = idx[j - 1] + 1;
    return 1;
}

static inline void mask_from_indices(uint64_t *mask, int64_t words, const int64_t *idx, int64_t r) {
    memset(mask, 0, (size_t)words * sizeof(uint64_t));
    for (int64_t i = 0; i < r; i++) mask_set(mask, idx[i]);
}

#endif
