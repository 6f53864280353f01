"""The float dtypes lowbit stores and computes in, by the names saved files and specs use."""

from __future__ import annotations

import torch

# Name (as in QuantSpec.scale_dtype and lowbit.json) -> dtype.
FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# dtype -> its name in FLOAT_DTYPES.
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
