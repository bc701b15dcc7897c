/* RNG and status strings: determinism, range, rough uniformity. */
#include <string.h>

#include "check.h"
#include "moei2_core.h"

static void test_rng_deterministic(void) {
    moei2_rng a, b;
    moei2_rng_seed(&a, 42);
    moei2_rng_seed(&b, 42);
    int same = 1;
    for (int i = 0; i < 1000; i++) same &= moei2_rng_next(&a) == moei2_rng_next(&b);
    CHECK(same);
    moei2_rng_seed(&b, 43);
    CHECK(moei2_rng_next(&a) != moei2_rng_next(&b));
}

static void test_rng_below_uniform(void) {
    moei2_rng rng;
    moei2_rng_seed(&rng, 7);
    int counts[7] = {0};
    int in_range = 1;
    for (int i = 0; i < 70000; i++) {
        uint64_t v = moei2_rng_below(&rng, 7);
        if (v >= 7) in_range = 0; else counts[v]++;
    }
    CHECK(in_range);
    for (int i = 0; i < 7; i++) CHECK(counts[i] > 9500 && counts[i] < 10500);
    double sum = 0;
    for (int i = 0; i < 10000; i++) {
        double u = moei2_rng_uniform(&rng);
        CHECK(u >= 0.0 && u < 1.0);
        sum += u;
    }
    CHECK(fabs(sum / 10000 - 0.5) < 0.02);
}

static void test_status_strings(void) {
    CHECK(strcmp(moei2_status_string(MOEI2_OK), "ok") == 0);
    CHECK(strlen(moei2_status_string(MOEI2_ERR_LAPACK)) > 0);
    CHECK(strcmp(moei2_status_string((moei2_status)99), "unknown error") == 0);
}

static void test_blas_threads(void) {
    int before = moei2_blas_get_num_threads();
    moei2_blas_set_num_threads(1);
    CHECK(moei2_blas_get_num_threads() == 1);
    moei2_blas_set_num_threads(before);
    CHECK(moei2_blas_config() != NULL);
}

int main(void) {
    test_rng_deterministic();
    test_rng_below_uniform();
    test_status_strings();
    test_blas_threads();
    return check_report("test_common");
}
