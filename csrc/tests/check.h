/* Minimal unit-test support for the C kernels: no framework, one binary per test file. */
#ifndef MOEI2_CHECK_H
#define MOEI2_CHECK_H

#include <math.h>
#include <stdio.h>

static int check_passed = 0, check_failed = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (cond) {                                                                      \
            check_passed++;                                                              \
        } else {                                                                         \
            check_failed++;                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
        }                                                                                \
    } while (0)

#define CHECK_CLOSE(a, b, rtol)                                                          \
    do {                                                                                 \
        double check_a_ = (double)(a), check_b_ = (double)(b);                           \
        double check_tol_ = (rtol) * fmax(1.0, fmax(fabs(check_a_), fabs(check_b_)));    \
        if (fabs(check_a_ - check_b_) <= check_tol_) {                                   \
            check_passed++;                                                              \
        } else {                                                                         \
            check_failed++;                                                              \
            fprintf(stderr, "%s:%d: %s = %.17g vs %s = %.17g (rtol %g)\n", __FILE__,      \
                    __LINE__, #a, check_a_, #b, check_b_, (double)(rtol));               \
        }                                                                                \
    } while (0)

/* Prints the closing line and gives main's exit status. */
static int check_report(const char *suite) {
    printf("%s: %d passed, %d failed\n", suite, check_passed, check_failed);
    return check_failed ? 1 : 0;
}

#endif
