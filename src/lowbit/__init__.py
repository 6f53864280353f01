"""lowbit: quantize PyTorch models to 8, 4, 3 and 2 bits, and measure what it costs.

>>> import lowbit
>>> spec = lowbit.QuantSpec(bits=4, group_size=64)
>>> report = lowbit.quantize_model(model, {"lm_head": None, "*": spec})   # doctest: +SKIP
>>> lowbit.save(model, "out/")                                           # doctest: +SKIP
"""

from lowbit.io import load, save
from lowbit.model import check_rules, quantize_model
from lowbit.nn import QuantLinear, release_workspaces
from lowbit.quantize import quantize
from lowbit.report import LayerReport, Report
from lowbit.spec import QuantSpec
from lowbit.tensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "LayerReport",
    "QuantLinear",
    "QuantSpec",
    "QuantizedTensor",
    "Report",
    "check_rules",
    "load",
    "quantize",
    "quantize_model",
    "release_workspaces",
    "save",
]
