/* BLAS/LAPACKE access for the kernels.
 *
 * The scipy-openblas32 wheel exports every symbol with a "scipy_" prefix, a system OpenBLAS with
 * none; setup.py passes BLAS_SYMBOL_PREFIX when there is one. Kernels call BLAS through BLASFN()
 * so the same source links against either. */
#ifndef MOEI2_BLAS_H
#define MOEI2_BLAS_H

#include <cblas.h>
#include <lapacke.h>

#define MOEI2_CONCAT_(a, b) a##b
#define MOEI2_CONCAT(a, b) MOEI2_CONCAT_(a, b)
#ifdef BLAS_SYMBOL_PREFIX
#define BLASFN(name) MOEI2_CONCAT(BLAS_SYMBOL_PREFIX, name)
#else
#define BLASFN(name) name
#endif

#endif
