"""Token-wise layers with small weights, by structure: every RMSNorm / LayerNorm variant.

Norm layers come in many classes (one per model family, Gemma's ``x̂ ⊙ (1 + w)``, q/k norms,
norms without bias or with an offset); listing them by name misses every new family. A module
without a registered kernel is taken *by structure* instead when (:meth:`TokenWiseKernel.
unsupported` gives the reason when it is not):

- its own parameters are 1-D, of one length (a weight, optionally a bias or offset);
- it has no submodules, and its ``forward`` takes exactly one argument (the hidden states);
- it is not a ``torch.nn`` built-in (those without a kernel of their own are not token-wise along
  the last dim: batch, instance and group norms normalise across tokens or channels, ``PReLU``
  scales dim 1);
- at run time, its input is floating point; its tokens are all dims but the last (else the
  microbatch fails with a ``TypeError``).

Per-sequence gradients are those of the module's own forward applied to one token at a time,
``f(x_t; θ)``: ``g_s(θ) = Σ_{t ∈ s} ∂⟨b_t, f(x_t; θ)⟩/∂θ``, computed with ``torch.func.vmap``
of ``torch.func.grad`` over the tokens (in chunks of ``_TOKEN_CHUNK_BYTES`` of per-token
gradients) and summed by sequence, in float32 (``dtype``). This is exact for any module that
treats tokens independently. A module that mixes tokens (statistics over the sequence, say)
gives per-token gradients whose sum is not autograd's gradient, and the consistency check raises
:class:`~proma_accum.IncompleteSequenceDataError` before anything is projected; its parameters
can then be excluded (``exclude=[...]``) or get a registered kernel.

Modules with a kernel registered for their exact type (``nn.LayerNorm``, ``nn.RMSNorm``, the
Qwen/Llama/Mistral RMSNorms) use it: the analytic forms are cheaper.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from .._layout import ShapeMismatchError, segment_sum
from ._base import Kernel, LayerUse, Rows, tokens

# Per-token gradients formed at once (tokens × d × itemsize): bounded, whatever the token count.
_TOKEN_CHUNK_BYTES = 16 * 2**20


def is_candidate(module: nn.Module) -> bool:
    """Whether ``module``'s own parameters are all 1-D (it is then judged by
    :meth:`TokenWiseKernel.unsupported`)."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dim() == 1 for p in own)


def _single_input(forward: object) -> bool:
    """``forward`` takes exactly one argument (besides ``self``), with no ``*args``/``**kwargs``."""
    try:
        params = list(inspect.signature(forward).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


class _Forward(nn.Module):
    """Calls ``inner.forward`` directly: the module's math without its hooks (the accumulator's
    own forward hook among them)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(x)


class TokenWiseKernel(Kernel):
    """Per-sequence gradients of a token-wise module from its own forward, token by token."""

    kind = "token_wise"
    # The module's own math may multiply by its weight in a half dtype token by token (autograd
    # then rounds each token's contribution): ``contribution_sq_norm_sum``.
    per_token_rounding = True

    def roles(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return dict(module.named_parameters(recurse=False))

    def unsupported(self, module: nn.Module) -> str | None:
        cls = type(module).__name__
        sizes = {p.numel() for p in module.parameters(recurse=False)}
        if len(sizes) != 1:
            return f"{cls} is not token-wise by structure: its 1-D parameters differ in length"
        if any(True for _ in module.children()):
            return f"{cls} is not token-wise by structure: it has submodules"
        if type(module).__module__.startswith("torch.nn."):
            return f"torch.nn.{cls} is not applied token by token along its input's last dim"
        if not _single_input(module.forward):
            return f"{cls} is not token-wise by structure: its forward takes several inputs"
        return None

    def lead_shape(self, module: nn.Module, x: torch.Tensor) -> torch.Size:
        if not x.is_floating_point() or x.dim() < 1:
            raise TypeError(
                f"{type(module).__name__} (covered as a token-wise layer) was called with a "
                f"{x.dtype} input of shape {tuple(x.shape)}, not float features; exclude its "
                "parameters with exclude=[...] or register a kernel for it"
            )
        return x.shape[:-1]

    def _token_grads(self, use: LayerUse, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The role's per-token gradients ``∂⟨b_t, f(x_t; θ)⟩/∂θ``, ``(n, d)`` for ``n``
        consecutive tokens at a time (``_TOKEN_CHUNK_BYTES`` each)."""
        module = use.module
        params = {
            f"inner.{n}": p.detach().to(dtype) for n, p in module.named_parameters(recurse=False)
        }
        call = _Forward(module)
        x = tokens(use.x, 1, dtype)
        b = tokens(use.grad_out, 1, dtype)
        if b.shape != x.shape:
            raise ShapeMismatchError(
                f"{type(module).__name__}: output gradient of shape {tuple(use.grad_out.shape)} "
                f"does not match the input's {tuple(use.x.shape)}: not a token-wise layer"
            )
        role = f"inner.{use.role}"

        def inner(theta: torch.Tensor, x_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
            y = torch.func.functional_call(call, {**params, role: theta}, (x_t[None],))
            return (y.reshape(-1).to(dtype) * b_t).sum()

        per_token = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))
        n, d = x.shape
        step = max(1, _TOKEN_CHUNK_BYTES // max(1, d * dtype.itemsize))
        for a in range(0, n, step):
            yield per_token(params[role], x[a : a + step], b[a : a + step])

    def contribution_sq_norm_sum(self, use: LayerUse) -> torch.Tensor:
        """``Σ_t ‖c_t‖²`` over the per-token gradients."""
        total = torch.zeros((), dtype=torch.float64, device=use.grad_out.device)
        for grads in self._token_grads(use, torch.float32):
            total = total + torch.linalg.vector_norm(grads, dtype=torch.float64).square()
        return total

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        k = use.num_sequences
        seq = torch.where(use.seg.token_seq >= 0, use.seg.token_seq, k)
        chunks = self._token_grads(use, dtype)
        first = next(chunks)
        if first.shape[0] == seq.numel():  # one chunk: all tokens
            return segment_sum(first, use.seg)[:, rows]
        total = first.new_zeros(k + 1, first.shape[1])
        total.index_add_(0, seq[: first.shape[0]], first)
        a = first.shape[0]
        for grads in chunks:
            total.index_add_(0, seq[a : a + grads.shape[0]], grads)
            a += grads.shape[0]
        return total[:, rows]
