"""Plain NumPy reference implementations of every C kernel, in float64.

These are the test oracles: written for clarity, not speed. The C kernels must match them.
"""
import numpy as np

# ==== lowrank reference =====================================================================


# ==== end lowrank reference =================================================================



# ==== search reference ======================================================================


# ==== end search reference ==================================================================
