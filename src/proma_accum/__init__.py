"""PROMA (Projected Microbatch Accumulation) for any PyTorch training loop.

While gradients are accumulated over microbatches, each parameter tensor's running gradient is
projected orthogonally to the span of the current microbatch's per-sequence gradients (clamped),
then the microbatch gradient is added — layer by layer, during the backward pass.
"""

from ._accumulator import ProjectedAccumulator

__version__ = "0.1.0"

__all__ = ["ProjectedAccumulator", "__version__"]
