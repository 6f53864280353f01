"""Scale (and zero point) search per block, looked up by name."""

from lowbit.fit import minmax as _minmax  # noqa: F401  (registers minmax and absmax)
from lowbit.fit.registry import FitFn, available_fits, get_fit, register_fit

__all__ = ["FitFn", "available_fits", "get_fit", "register_fit"]
