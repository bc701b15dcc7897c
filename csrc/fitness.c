/* Exact re-routed reconstruction loss of one MoE layer for a batch of expert masks.
 *
 * The cache (see moei2_core.h) replaces each token's candidate output vectors by R, the
 * triangular QR factor of the d x C matrix they form. For a mask S the token's error is
 *   y - y_S = sum_q c_q o_q,   c_q = (old weight of candidate q) - (new weight of q),
 * so ||y - y_S|| = ||R c||. Only candidates up to the k-th survivor can carry a nonzero c_q,
 * and R's column j has j+1 entries, so a token costs O(L^2) with L about k + (dropped among its
 * best experts), independent of the hidden size.
 *
 * The coefficients are formed without subtracting nearly equal weights. With A the old
 * normaliser and B the new one (renormalising: the sums of the old and new top-k
 * probabilities; otherwise 1 and the surviving probability mass 1 - P_S), an expert that stays
 * in the top-k has c_q = s p_q (B - A) / (A B), where B - A is a sum of the probabilities that
 * actually changed: (entrants - dropped) or -P_S. An unaffected token (no top-k expert dropped)
 * contributes exactly 0 when renormalising, and (P_S / (1 - P_S))^2 ||y||^2 otherwise. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "moei2_blas.h"
#include "moei2_core.h"
#include "search_internal.h"

/* ---- preparation: ranking and softmax --------------------------------------------------- */

moei2_status moei2_search_prepare(int64_t num_tokens, int64_t num_experts, int64_t top_k,
                                  int64_t num_candidates, const double *logits, int32_t *candidates,
                                  double *candidate_probs, double *probs, uint64_t *topk_bits) {
    const int64_t N = num_tokens, E = num_experts, k = top_k, C = num_candidates;
    if (N < 0 || k < 1 || C <= k || C > E || E > INT32_MAX) return MOEI2_ERR_ARG;
    const int64_t W = MOEI2_MASK_WORDS(E);
    double *p = malloc((size_t)E * sizeof(double));
    if (!p) return MOEI2_ERR_NOMEM;
    moei2_status status = MOEI2_OK;
    for (int64_t n = 0; n < N; n++) {
        const double *z = logits + n * E;
        int32_t *cand = candidates + n * C;
        /* Insertion into a sorted prefix; a strict comparison keeps the lower index first on
         * equal logits, the tie rule used everywhere. */
        int64_t filled = 0;
        for (int64_t j = 0; j < E; j++) {
            if (!isfinite(z[j])) { status = MOEI2_ERR_NONFINITE; goto done; }
            if (filled == C && !(z[j] > z[cand[C - 1]])) continue;
            int64_t pos = filled < C ? filled : C - 1;
            while (pos > 0 && z[j] > z[cand[pos - 1]]) {
                cand[pos] = cand[pos - 1];
                pos--;
            }
            cand[pos] = (int32_t)j;
            if (filled < C) filled++;
        }
        const double top = z[cand[0]];
        double total = 0.0;
        for (int64_t j = 0; j < E; j++) {
            p[j] = exp(z[j] - top);
            total += p[j];
        }
        for (int64_t j = 0; j < E; j++) p[j] /= total;
        for (int64_t q = 0; q < C; q++) {
            candidate_probs[n * C + q] = p[cand[q]];
            /* A zero probability would make a re-routed token's weights 0/0. */
            if (!(p[cand[q]] > 0.0)) { status = MOEI2_ERR_NONFINITE; goto done; }
        }
        if (probs) memcpy(probs + n * E, p, (size_t)E * sizeof(double));
        uint64_t *bits = topk_bits + n * W;
        memset(bits, 0, (size_t)W * sizeof(uint64_t));
        for (int64_t q = 0; q < k; q++) mask_set(bits, cand[q]);
    }
done:
    free(p);
    return status;
}

/* ---- factors of the candidate outputs --------------------------------------------------- */

moei2_status moei2_search_factor(int64_t num_tokens, int64_t num_candidates, int64_t dim,
                                 const float *outputs_f32, const double *outputs_f64, int64_t top_k,
                                 int renormalize, double scaling, const double *candidate_probs,
                                 double *factor, double *output_norm2) {
    const int64_t N = num_tokens, C = num_candidates, d = dim, k = top_k;
    if (N < 0 || C < 1 || d < 1 || k < 1 || k > C || (outputs_f32 == NULL) == (outputs_f64 == NULL))
        return MOEI2_ERR_ARG;
    if (d > INT32_MAX || C > INT32_MAX) return MOEI2_ERR_ARG;
    const int64_t P = MOEI2_PACKED_SIZE(C);
    double *a = malloc((size_t)(d * C) * sizeof(double));
    double *tau = malloc((size_t)C * sizeof(double));
    double *w = malloc((size_t)k * sizeof(double));
    double *work = NULL;
    moei2_status status = MOEI2_OK;
    if (!a || !tau || !w) { status = MOEI2_ERR_NOMEM; goto done; }
    {
        double query = 0.0;
        lapack_int info = BLASFN(LAPACKE_dgeqrf_work)(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)C, a,
                                                      (lapack_int)d, tau, &query, -1);
        if (info != 0) { status = MOEI2_ERR_LAPACK; goto done; }
        lapack_int lwork = (lapack_int)query;
        if (lwork < (lapack_int)C) lwork = (lapack_int)C;
        work = malloc((size_t)lwork * sizeof(double));
        if (!work) { status = MOEI2_ERR_NOMEM; goto done; }
        const int64_t rows = d < C ? d : C;
        for (int64_t n = 0; n < N; n++) {
            /* The token's [C, d] row-major block is the d x C column-major matrix whose columns
             * are the candidate outputs: LAPACK factors it in place without a transpose. */
            if (outputs_f32) {
                const float *src = outputs_f32 + n * C * d;
                for (int64_t i = 0; i < C * d; i++) a[i] = (double)src[i];
            } else {
                memcpy(a, outputs_f64 + n * C * d, (size_t)(C * d) * sizeof(double));
            }
            for (int64_t i = 0; i < C * d; i++)
                if (!isfinite(a[i])) { status = MOEI2_ERR_NONFINITE; goto done; }
            info = BLASFN(LAPACKE_dgeqrf_work)(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)C, a, (lapack_int)d,
                                               tau, work, lwork);
            if (info != 0) { status = MOEI2_ERR_LAPACK; goto done; }
            double *r = factor + n * P;
            for (int64_t j = 0; j < C; j++) {
                double *col = r + MOEI2_PACKED_SIZE(j);
                for (int64_t i = 0; i <= j; i++) col[i] = i < rows ? a[j * d + i] : 0.0;
            }
            /* ||y||^2 = ||R w||^2 with w the original top-k weights (the first k candidates). */
            const double *cp = candidate_probs + n * C;
            double norm = 1.0;
            if (renormalize) {
                norm = 0.0;
                for (int64_t q = 0; q < k; q++) norm += cp[q];
            }
            for (int64_t q = 0; q < k; q++) w[q] = scaling * cp[q] / norm;
            double sum = 0.0;
            for (int64_t i = 0; i < k; i++) {
                double v = 0.0;
                for (int64_t j = i; j < k; j++) v += r[MOEI2_PACKED_SIZE(j) + i] * w[j];
                sum += v * v;
            }
            output_norm2[n] = sum;
        }
    }
done:
    free(a);
    free(tau);
    free(w);
    free(work);
    return status;
}

/* ---- the loss of a batch of masks ------------------------------------------------------- */

/* Shared, read-only description of the masks being scored. ids[m] lists mask m's dropped
 * experts first (drop_count[m] of them), then its kept ones: the dropped list gives P_S in r
 * loads, the kept list the surviving mass when P_S is large and 1 - P_S would lose digits. */
typedef struct {
    const moei2_search_cache *cache;
    const uint64_t *masks;
    const int32_t *ids;
    const int64_t *drop_count;
    double *losses;
} loss_job;

typedef struct {
    const loss_job *job;
    int64_t first, last; /* masks [first, last) */
    moei2_status status;
} loss_slice;

/* Loops tokens outside and masks inside, so a token's cache entry is read from memory once
 * per batch of masks rather than once per mask. */
static moei2_status score_slice(const loss_job *job, int64_t first, int64_t last) {
    const moei2_search_cache *cache = job->cache;
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates;
    const int64_t W = MOEI2_MASK_WORDS(E), P = MOEI2_PACKED_SIZE(C), M = last - first;
    const int renorm = cache->renormalize;
    const double s = cache->scaling;
    if (M <= 0) return MOEI2_OK;
    double *acc = malloc((size_t)M * sizeof(double));
    double *coef = malloc((size_t)C * sizeof(double));
    double *v = malloc((size_t)C * sizeof(double));
    unsigned char *dropped = malloc((size_t)C);
    if (!acc || !coef || !v || !dropped) {
        free(acc); free(coef); free(v); free(dropped);
        return MOEI2_ERR_NOMEM;
    }
    for (int64_t m = first; m < last; m++) job->losses[m] = 0.0;
    int64_t start = 0;
    for (int64_t b = 0; b < cache->num_batches; b++) {
        const int64_t end = cache->batch_ends[b];
        memset(acc, 0, (size_t)M * sizeof(double));
        for (int64_t n = start; n < end; n++) {
            const int32_t *cand = cache->candidates + n * C;
            const double *cp = cache->candidate_probs + n * C;
            const double *r = cache->factor + n * P;
            const uint64_t *tb = cache->topk_bits + n * W;
            const double *prow = renorm ? NULL : cache->probs + n * E;
            const double y2 = cache->output_norm2[n];
            double A = 1.0;
            if (renorm) {
                A = 0.0;
                for (int64_t q = 0; q < k; q++) A += cp[q];
            }
            for (int64_t m = first; m < last; m++) {
                const uint64_t *mb = job->masks + m * W;
                uint64_t hit = 0;
                for (int64_t w = 0; w < W; w++) hit |= tb[w] & mb[w];
                double ps = 0.0, zs = 1.0;
                if (!renorm) {
                    const int32_t *ids = job->ids + m * E;
                    const int64_t nd = job->drop_count[m];
                    for (int64_t i = 0; i < nd; i++) ps += prow[ids[i]];
                    if (ps <= 0.5) {
                        zs = 1.0 - ps;
                    } else {
                        zs = 0.0;
                        for (int64_t i = nd; i < E; i++) zs += prow[ids[i]];
                    }
                    if (!hit) {
                        const double t = ps / zs;
                        acc[m - first] += t * t * y2;
                        continue;
                    }
                } else if (!hit) {
                    continue;
                }
                /* Walk the candidates to the k-th survivor: those are the new top-k. */
                double lost = 0.0, gained = 0.0;
                int64_t survivors = 0, L = 0;
                while (survivors < k) {
                    const int d = mask_test(mb, cand[L]);
                    dropped[L] = (unsigned char)d;
                    if (d) {
                        if (L < k) lost += cp[L];
                    } else {
                        survivors++;
                        if (L >= k) gained += cp[L];
                    }
                    L++;
                }
                const double B = renorm ? A - lost + gained : zs;
                const double diff = renorm ? gained - lost : -ps;
                const double stay = s * diff / (A * B), out = s / A, in = -s / B;
                for (int64_t q = 0; q < L; q++) {
                    if (q < k) coef[q] = (dropped[q] ? out : stay) * cp[q];
                    else coef[q] = dropped[q] ? 0.0 : in * cp[q];
                }
                for (int64_t i = 0; i < L; i++) v[i] = 0.0;
                for (int64_t j = 0; j < L; j++) {
                    const double cj = coef[j];
                    if (cj == 0.0) continue;
                    const double *col = r + MOEI2_PACKED_SIZE(j);
                    for (int64_t i = 0; i <= j; i++) v[i] += col[i] * cj;
                }
                double sum = 0.0;
                for (int64_t i = 0; i < L; i++) sum += v[i] * v[i];
                acc[m - first] += sum;
            }
        }
        for (int64_t m = first; m < last; m++) job->losses[m] += sqrt(acc[m - first]);
        start = end;
    }
    free(acc);
    free(coef);
    free(v);
    free(dropped);
    return MOEI2_OK;
}

static void *score_slice_thread(void *arg) {
    loss_slice *slice = arg;
    slice->status = score_slice(slice->job, slice->first, slice->last);
    return NULL;
}

moei2_status moei2_search_loss(const moei2_search_cache *cache, const uint64_t *masks, int64_t num_masks,
                               int num_threads, double *losses) {
    const int64_t E = cache->num_experts, k = cache->top_k, C = cache->num_candidates, M = num_masks;
    const int64_t W = MOEI2_MASK_WORDS(E);
    if (M < 0 || k < 1 || C <= k || C > E || cache->num_batches < 1) return MOEI2_ERR_ARG;
    if (!cache->renormalize && cache->probs == NULL) return MOEI2_ERR_ARG;
    if (M == 0) return MOEI2_OK;
    int32_t *ids = malloc((size_t)(M * E) * sizeof(int32_t));
    int64_t *drop_count = malloc((size_t)M * sizeof(int64_t));
    if (!ids || !drop_count) {
        free(ids);
        free(drop_count);
        return MOEI2_ERR_NOMEM;
    }
    moei2_status status = MOEI2_OK;
    for (int64_t m = 0; m < M; m++) {
        const uint64_t *mb = masks + m * W;
        /* Bits past E and masks dropping more than C - k experts would send the candidate walk
         * past the cached candidates. */
        if (E % 64 && (mb[W - 1] >> (E % 64))) { status = MOEI2_ERR_ARG; goto done; }
        int64_t nd = 0, nk = 0;
        const int64_t r = mask_count(mb, W);
        if (r > C - k) { status = MOEI2_ERR_ARG; goto done; }
        int32_t *row = ids + m * E;
        for (int64_t j = 0; j < E; j++) {
            if (mask_test(mb, j)) row[nd++] = (int32_t)j;
            else row[r + nk++] = (int32_t)j;
        }
        drop_count[m] = r;
    }
    {
        loss_job job = {cache, masks, ids, drop_count, losses};
        int64_t threads = num_threads < 1 ? 1 : num_threads;
        if (threads > M) threads = M;
        loss_slice *slices = calloc((size_t)threads, sizeof(loss_slice));
        pthread_t *handles = calloc((size_t)threads, sizeof(pthread_t));
        int *started = calloc((size_t)threads, sizeof(int));
        if (!slices || !handles || !started) {
            free(slices); free(handles); free(started);
            status = MOEI2_ERR_NOMEM;
            goto done;
        }
        for (int64_t t = 0; t < threads; t++) {
            slices[t].job = &job;
            slices[t].first = M * t / threads;
            slices[t].last = M * (t + 1) / threads;
        }
        /* Slice 0 runs on the calling thread; a slice whose thread cannot start runs there too.
         * Each mask is summed by exactly one thread in token order, so the split never changes
         * a result. */
        for (int64_t t = 1; t < threads; t++)
            started[t] = pthread_create(&handles[t], NULL, score_slice_thread, &slices[t]) == 0;
        score_slice_thread(&slices[0]);
        for (int64_t t = 1; t < threads; t++) {
            if (started[t]) pthread_join(handles[t], NULL);
            else score_slice_thread(&slices[t]);
        }
        for (int64_t t = 0; t < threads; t++)
            if (slices[t].status != MOEI2_OK) status = slices[t].status;
        free(slices);
        free(handles);
        free(started);
    }
done:
    free(ids);
    free(drop_count);
    return status;
}
