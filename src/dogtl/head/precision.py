"""Which number format the head's big matrix products use.

A head's time goes into its hidden Dense layers' matmuls. On CPUs that multiply bfloat16
in hardware (AVX512-BF16 or AMX: recent AMD EPYC/Ryzen and Intel Xeon), those run ~1.7x
faster in bfloat16 than in float32, with float32 accumulation, float32 weights and
float32 normalisation and softmax: `benchmarks/bench_head.py` measures the speed and
`benchmarks/batch_quality.py` the validation log loss. Below a batch of AUTO_MIN_BATCH the
casts to and from bfloat16 cost more than the smaller matmuls save, and elsewhere bfloat16
is emulated and slower, so "auto" keeps float32 there (and on GPUs, where the head costs
nothing anyway).
"""

from __future__ import annotations

from dogtl.core.precision import native_bfloat16  # noqa: F401  (one hardware check for every stage)

PRECISIONS = ("auto", "float32", "bfloat16")
AUTO_MIN_BATCH = 64


def resolve_precision(precision: str, batch_size: int) -> str:
    """'float32' or 'bfloat16': what `precision` (one of PRECISIONS) means on this machine and batch."""
    if precision == "auto":
        return "bfloat16" if batch_size >= AUTO_MIN_BATCH and native_bfloat16() else "float32"
    return precision
