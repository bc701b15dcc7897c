/* Expert importance (the loss of dropping one expert alone) and greedy removal, both built on
 * the batched loss kernel: all masks of a step are scored in one call so the cache is read
 * once per step. */
#include <stdlib.h>
#include <string.h>

#include "moei2_core.h"
#include "search_internal.h"

moei2_status moei2_search_expert_importance(const moei2_search_cache *cache, int num_threads,
                                            double *importance) {
    const int64_t E = cache->num_experts, W = MOEI2_MASK_WORDS(E);
    if (cache->num_candidates <= cache->top_k || E <= cache->top_k) return MOEI2_ERR_ARG;
    uint64_t *masks = calloc((size_t)(E * W), sizeof(uint64_t));
    if (!masks) return MOEI2_ERR_NOMEM;
    for (int64_t j = 0; j < E; j++) mask_set(masks + j * W, j);
    moei2_status status = moei2_search_loss(cache, masks, E, num_threads, importance);
    free(masks);
    return status;
}

moei2_status moei2_search_greedy(const moei2_search_cache *cache, int64_t drop_count, int num_threads,
                                 uint64_t *mask, double *step_best, double *step_mean,
                                 int64_t *evaluations) {
    const int64_t E = cache->num_experts, W = MOEI2_MASK_WORDS(E), r = drop_count;
    if (r < 0 || r > cache->num_candidates - cache->top_k || r > E - cache->top_k) return MOEI2_ERR_ARG;
    uint64_t *trial = malloc((size_t)(E * W) * sizeof(uint64_t));
    int64_t *expert = malloc((size_t)E * sizeof(int64_t));
    double *loss = malloc((size_t)E * sizeof(double));
    moei2_status status = MOEI2_OK;
    if (!trial || !expert || !loss) { status = MOEI2_ERR_NOMEM; goto done; }
    memset(mask, 0, (size_t)W * sizeof(uint64_t));
    int64_t scored = 0;
    for (int64_t step = 0; step < r; step++) {
        int64_t count = 0;
        for (int64_t j = 0; j < E; j++) {
            if (mask_test(mask, j)) continue;
            memcpy(trial + count * W, mask, (size_t)W * sizeof(uint64_t));
            mask_set(trial + count * W, j);
            expert[count++] = j;
        }
        status = moei2_search_loss(cache, trial, count, num_threads, loss);
        if (status != MOEI2_OK) goto done;
        scored += count;
        /* Candidates are in increasing expert order, so a strict comparison breaks ties
         * towards the lower index. */
        int64_t best = 0;
        double sum = 0.0;
        for (int64_t i = 0; i < count; i++) {
            sum += loss[i];
            if (loss[i] < loss[best]) best = i;
        }
        mask_set(mask, expert[best]);
        step_best[step] = loss[best];
        step_mean[step] = sum / (double)count;
    }
    *evaluations = scored;
done:
    free(trial);
    free(expert);
    free(loss);
    return status;
}
