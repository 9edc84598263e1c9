"""flowssm: matrix-valued state space models (DeltaNet family) as linear controlled ODEs.

The state ``S`` (``K x V`` per head) follows ``dS = d omega . S + d xi`` driven by the token path; a
chunk's solution map is an affine flow ``S -> P S + Q`` and flows compose associatively.
"""

import os

# On CPU, jax runs triangular solves through scipy's OpenBLAS, loaded lazily after this point; its
# threads fight XLA's for the cores (measured: 500 ms instead of 2 ms per call on 2 busy cores). One
# thread unless the user chose otherwise; numpy's own BLAS, already loaded, is not affected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from flowssm import flows, paths, scan, solvers
from flowssm.ops import (delta_rule, delta_rule_step, dplr_delta_rule, dplr_delta_rule_step, linear_attention,
                         linear_attention_step)
from flowssm.solvers import Euler, Exact, LogODE, Signature, get_solver

__all__ = [
    "Euler",
    "Exact",
    "LogODE",
    "Signature",
    "delta_rule",
    "delta_rule_step",
    "dplr_delta_rule",
    "dplr_delta_rule_step",
    "flows",
    "get_solver",
    "linear_attention",
    "linear_attention_step",
    "paths",
    "scan",
    "solvers",
]
