"""The dtypes a config may name, in one place: name -> numpy dtype (JAX accepts these; ``itemsize`` gives bytes).

Compute dtype (``ModelConfig.dtype``) and parameter dtype (``ModelConfig.param_dtype``) are chosen from this
table; softmax, norms and the loss are always float32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = tuple(DTYPES)


def dtype_bytes(name: str) -> int:
    return DTYPES[name].itemsize
