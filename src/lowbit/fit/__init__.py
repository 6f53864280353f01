"""Scale (and zero point) search per block, looked up by name."""

from lowbit.fit import dare as _dare  # noqa: F401
from lowbit.fit import entropy_fit as _entropy  # noqa: F401
from lowbit.fit import hqq as _hqq  # noqa: F401
from lowbit.fit import minmax as _minmax  # noqa: F401  (registers minmax and absmax)
from lowbit.fit import mse as _mse  # noqa: F401
from lowbit.fit import percentile as _percentile  # noqa: F401
from lowbit.fit.registry import (
    FitFn,
    FitInfo,
    Option,
    available_fits,
    bool_option,
    choice_option,
    fit_defaults,
    fit_options,
    fit_uses_importance,
    float_option,
    get_fit,
    get_fit_info,
    int_option,
    register_fit,
)

__all__ = [
    "FitFn",
    "FitInfo",
    "Option",
    "available_fits",
    "bool_option",
    "choice_option",
    "fit_defaults",
    "fit_options",
    "fit_uses_importance",
    "float_option",
    "get_fit",
    "get_fit_info",
    "int_option",
    "register_fit",
]
