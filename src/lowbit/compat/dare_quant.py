"""DARE-Quantization's API (``DAREQuantLinear``) over lowbit's core.

Same name, signature and defaults as DARE: ``DAREQuantLinear(linear, bits=4, bins=128,
lambda_weight=1.0, lambda_entropy=0.1)`` is a drop-in ``nn.Module`` with ``.weight_q`` (the
dequantized weight, ``linear.weight``'s shape, dtype and device), ``.bias`` (the original bias)
and ``forward(x) = F.linear(x, weight_q, bias)``. Per output channel it minimises DARE's
objective ``lambda_weight * mean((w - w_hat)**2) + lambda_entropy * H(w - w_hat)`` (see
`lowbit.fit.dare` for ``H``) with a symmetric ``bits``-bit integer grid, searched over all
channels at once by the ``dare`` fit. It also keeps the real codes: ``.quantized`` is a
`QuantizedTensor` (float32 scales, so ``weight_q`` is exactly what the search scored).

Fixed faults of the seed (the API is unchanged):

* its scale grid ``linspace(max|w| / qmax, max|w|, 20)`` never goes below the absmax scale, so
  it never clips and in practice is plain absmax rounding. The search here scores those 20
  scales and 20 clipping ones (down to 0.3x), so each row's loss is at most the seed's;
* all-zero rows raised (division by a zero scale); here they are restored as exact zeros;
* bf16 (and fp16) layers raised; here they are searched in float32 and ``weight_q`` keeps the
  layer's dtype;
* ``bits=1`` divided by zero (``qmax = 2**0 - 1 = 0``); here ``bits`` outside 2..8 is a
  ``ValueError`` naming it;
* it quantized with a Python loop over rows; here every row is searched at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quantize import quantize
from lowbit.spec import QuantSpec


def dare_spec(bits: int, bins: int, lambda_weight: float, lambda_entropy: float) -> QuantSpec:
    """The lowbit spec DAREQuantLinear uses: symmetric int, per channel, ``dare`` fit."""
    return QuantSpec(
        bits=bits,
        granularity="channel",
        symmetric=True,
        fit="dare",
        fit_options={
            "bins": bins,
            "lambda_weight": float(lambda_weight),
            "lambda_entropy": float(lambda_entropy),
        },
        scale_dtype="float32",
    )


class DAREQuantLinear(nn.Module):
    """Linear layer with DARE-searched ``bits``-bit per-channel weights.

    Args:
        linear: the `nn.Linear` to quantize (fp32, fp16 or bf16, any device).
        bits: code width, 2..8 (default 4).
        bins: histogram bins of the residual entropy (default 128).
        lambda_weight: weight of the mean squared error (default 1.0).
        lambda_entropy: weight of the residual entropy (default 0.1).

    Attributes:
        weight_q: dequantized weight ``[out, in]`` in the layer's dtype (a buffer).
        bias: the original bias (a parameter) or ``None``.
        quantized: the codes and scales as a `QuantizedTensor`.
        scales: float32 ``[out]``, the chosen scale per output channel.

    Raises:
        TypeError: ``linear`` is not an ``nn.Linear``, or a numeric argument has the wrong type.
        ValueError: ``bits`` outside 2..8, ``bins`` < 1, negative lambdas, NaN/Inf weights.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: int = 4,
        bins: int = 128,
        lambda_weight: float = 1.0,
        lambda_entropy: float = 0.1,
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"bits must be an int, got {bits!r}")
        if not 2 <= bits <= 8:
            raise ValueError(
                f"bits={bits} is out of range (2..8); DARE's qmax = 2**(bits-1) - 1 is 0 at 1 bit"
            )
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        for name, value in (("lambda_weight", lambda_weight), ("lambda_entropy", lambda_entropy)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.bins = bits, bins
        self.lambda_weight, self.lambda_entropy = float(lambda_weight), float(lambda_entropy)
        weight = linear.weight.detach()
        self.quantized = quantize(
            weight,
            dare_spec(bits, bins, lambda_weight, lambda_entropy),
            name="linear.weight",
        )
        self.register_buffer("weight_q", self.quantized.dequantize(weight.dtype))
        self.bias = linear.bias

    @property
    def scales(self) -> torch.Tensor:
        """float32 ``[out_features]``: the scale chosen for each output channel."""
        return self.quantized.scale.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight_q, bias)``; ``x``: ``[..., in_features]`` in the layer's dtype."""
        return F.linear(x, self.weight_q, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, bins={self.bins}, lambda_weight={self.lambda_weight}, "
            f"lambda_entropy={self.lambda_entropy}"
        )
