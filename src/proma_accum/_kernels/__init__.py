"""Per-sequence gradient kernels, one file per layer kind, looked up by the module's exact type.

A kernel turns what a hooked layer saw in the forward (its input) and the backward (the gradient
of its output) into the per-sequence gradients of its parameters, ``(k + 1, rows, ...)``: row
``i < k`` is sequence ``i``'s gradient, row ``k`` the part of tokens that belong to no sequence.
Classes from optional packages (transformers) are registered by qualified name, so nothing is
imported until a model uses them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .._distributed import unwrapped_class
from ._base import Kernel, LayerUse

_BY_TYPE: dict[type, Kernel] = {}
_BY_NAME: dict[str, Kernel] = {}


def register(*targets: type | str) -> Callable[[type[Kernel]], type[Kernel]]:
    """Class decorator: register a kernel for module types (or ``"module.QualName"`` strings).

    A later registration for the same target replaces the earlier one (so a user's kernel can
    replace a built-in one). Lookup is by exact type: register subclasses explicitly.
    """

    def wrap(kernel_cls: type[Kernel]) -> type[Kernel]:
        kernel = kernel_cls()
        for target in targets:
            if isinstance(target, str):
                _BY_NAME[target] = kernel
            else:
                _BY_TYPE[target] = kernel
        return kernel_cls

    return wrap


def kernel_for(module: nn.Module) -> Kernel | None:
    """The kernel registered for ``type(module)`` exactly (subclasses may change the math), else
    the Opacus fallback for the kinds it covers soundly (``opacus_fallback``), else for an
    ``nn.Embedding`` subclass the kernel its ``forward`` qualifies for (``embedding``), else for a
    module whose own parameters are all 1-D the structural token-wise kernel (``token_wise``),
    else None. The last two may refuse a module (``Kernel.unsupported``), with the reason.

    A module whose class FSDP2's ``fully_shard`` swapped gets its original class's kernel (see
    ``_distributed.unwrapped_class``).
    """
    cls = unwrapped_class(type(module))
    kernel = _BY_TYPE.get(cls)
    if kernel is None:
        kernel = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if kernel is None:
        kernel = fallback_for(cls)  # Opacus's per-sample gradients, one sequence per row
    if kernel is None:
        kernel = subclass_kernel(cls)
    if kernel is None and is_candidate(module):
        kernel = _TOKEN_WISE
    return kernel


# Importing the kernel modules registers them.
from . import conv1d, embedding, layer_norm, linear, moe, rms_norm, token_wise  # noqa: E402
from .embedding import subclass_kernel  # noqa: E402
from .opacus_fallback import fallback_for  # noqa: E402
from .token_wise import TokenWiseKernel, is_candidate  # noqa: E402

_TOKEN_WISE = TokenWiseKernel()

__all__ = [
    "Kernel",
    "LayerUse",
    "conv1d",
    "embedding",
    "kernel_for",
    "layer_norm",
    "linear",
    "moe",
    "register",
    "rms_norm",
    "token_wise",
]
