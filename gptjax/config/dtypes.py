"""The dtypes a config may name, in one place: the ``DType`` choice and name -> numpy dtype (JAX accepts these;
``itemsize`` gives bytes).

Compute dtype (``ModelConfig.dtype``) and parameter dtype (``ModelConfig.param_dtype``) are chosen from this
table, and export writes tensors in one of them; softmax, norms and the loss are always float32.
"""

from __future__ import annotations

import typing
from typing import Literal

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

DType = Literal["float32", "bfloat16"]
DTYPE_NAMES: tuple[str, ...] = typing.get_args(DType)
DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPE_NAMES}


def dtype_bytes(name: str) -> int:
    return DTYPES[name].itemsize
