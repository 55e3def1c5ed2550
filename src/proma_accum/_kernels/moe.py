"""transformers' sparse MoE blocks: the fused experts and the router, hooked at the block.

The block (Qwen3-MoE, Mixtral, OLMoE, GraniteMoE) routes each token ``x_t`` on its own: the
router ``R`` gives the chosen experts ``e_{t,j}`` and their weights ``w_{t,j}`` (``j < K``,
top-k), and the block's output is ``Σ_j w_{t,j} E_{e_{t,j}}(x_t)``. Expert ``e`` is stored as
slices of 3-D tensors: ``u = G_e x``, ``[g; v] = u``, ``a = act(g) ⊙ v``, ``E_e(x) = D_e a``.
With ``b_t`` the gradient of the block's output, for sequence ``s``:

- ``g_s(D_e) = Σ_{(t, j) ∈ s, e_{t,j} = e} w_{t,j} b_t a_{t,j}ᵀ``;
- ``g_s(G_e) = Σ_{(t, j) ∈ s, e_{t,j} = e} δu_{t,j} x_tᵀ`` with ``δa = w_{t,j} D_eᵀ b_t``,
  ``δg = δa ⊙ v ⊙ act'(g)``, ``δv = δa ⊙ act(g)``;
- ``g_s(R) = Σ_{t ∈ s} ∂⟨c_t, w(x_t; R)⟩/∂R`` with ``c_{t,j} = b_t · E_{e_{t,j}}(x_t)``: the
  router's own forward differentiated token by token (``torch.func.vmap`` of ``grad``), as the
  token-wise kernel does (its top-k choice is recomputed per token, as the forward made it).

Everything is recomputed from the block's saved input. Per expert, only the tokens routed to it
contribute, so the experts' per-sequence gradients are sparse by expert: the kernel forms them
only for the experts the microbatch routes to (``touched_rows``), a chunk of experts at a time.

Memory: one chunk of the experts' per-sequence gradients is at most the accumulator's
``chunk_bytes``, or ``(k + 1)`` copies of one expert's slice when that alone is larger; the
transient per expert is ``O(n_e (H + 2I))`` for its ``n_e`` routed tokens plus the per-sequence
token blocks ``(k + 1) × L × (H + 2I)`` (``L``: the most tokens one sequence routes to it). The
router's per-token gradients are formed ``_TOKEN_CHUNK_BYTES`` at a time; its per-sequence
gradients are ``(k + 1) × E × H``.

Qwen2-MoE's block adds a dense *shared expert* gated per token:
``y_t = Σ_j w_{t,j} E_{e_{t,j}}(x_t) + σ(z_t) M(x_t)`` with ``z_t = s · x_t``
(``shared_expert_gate``, ``(1, H)``) and ``M = D (act(G x) ⊙ U x)`` (``shared_expert``: three
``nn.Linear``). The block calls them on the tokens flattened to ``(B·T, H)``, which
``seq_ids`` cannot split at the ``nn.Linear`` level, so this kernel owns them too (their own
``nn.Linear`` hooks are not placed): with ``b'_t = σ(z_t) b_t``,
``g_s(D) = Σ_{t ∈ s} b'_t a_tᵀ``, ``g_s(G)`` and ``g_s(U)`` as for an expert of weight
``σ(z_t)``, and ``g_s(s) = Σ_{t ∈ s} σ'(z_t) (b_t · M(x_t)) x_tᵀ``.

A block is refused, with the reason, when its experts are not the plain gated, concatenated,
bias-free layout above, its router is not one ``(E, H)`` weight, (Mixtral) router jitter is on,
or (Qwen2-MoE) its shared expert is not three bias-free ``nn.Linear`` and a ``(1, H)`` gate.
A load-balancing loss on the router logits (``output_router_logits=True``) adds router gradient
outside the block's output: the consistency check then raises ``IncompleteSequenceDataError``;
exclude the router (``exclude=["*.mlp.gate.weight"]``) in that case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import register
from ._base import Kernel, LayerUse, Rows, tokens
from .linear import outer_by_sequence
from .token_wise import _TOKEN_CHUNK_BYTES, _Forward

GATE_UP, DOWN, ROUTER = "experts.gate_up_proj", "experts.down_proj", "gate.weight"
GRANITE_ROUTER = "router.weight"  # GraniteMoE names its router ``router``
ROUTERS = (ROUTER, GRANITE_ROUTER)
SHARED_GATE, SHARED_UP, SHARED_DOWN, SHARED_SCALE = (
    "shared_expert.gate_proj.weight",
    "shared_expert.up_proj.weight",
    "shared_expert.down_proj.weight",
    "shared_expert_gate.weight",
)
SHARED = (SHARED_GATE, SHARED_UP, SHARED_DOWN, SHARED_SCALE)
_HALF = (torch.float16, torch.bfloat16)


def outer_by_group(
    left: torch.Tensor, right: torch.Tensor, group: torch.Tensor, groups: int
) -> torch.Tensor:
    """``(groups, p, q)``: ``Σ_{n: group_n = s} left_n right_nᵀ`` for ``left: (n, p)``,
    ``right: (n, q)``, ``group: (n,)`` in ``[0, groups)``; one batched GEMM over zero-padded
    token blocks."""
    n = group.numel()
    counts = torch.bincount(group, minlength=groups)
    length = int(counts.max()) if n else 0
    order = torch.argsort(group, stable=True)
    g = group[order]
    pos = torch.arange(n, device=group.device) - (torch.cumsum(counts, 0) - counts)[g]
    lp = left.new_zeros(groups, length, left.shape[1])
    rp = right.new_zeros(groups, length, right.shape[1])
    lp[g, pos] = left[order]
    rp[g, pos] = right[order]
    return torch.bmm(lp.transpose(1, 2), rp)


@register(
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock",
)
class SparseMoeKernel(Kernel):
    kind = "moe"
    # Autograd rounds the per-token intermediates of the block's backward (the routing
    # weights' gradients, the experts' activation gradients) to a half parameter dtype, where
    # this kernel recomputes them in float32: the gradients then differ by up to ~u per token,
    # u · Σ_t ‖c_t‖ in all, which the consistency check allows (``contribution_norm_sum``).
    low_precision_accumulation = True
    router_role = ROUTER  # the router's weight, as a role: "<router submodule>.weight"

    def roles(self, module: nn.Module) -> dict[str, nn.Parameter]:
        found = {}
        for role in (GATE_UP, DOWN, self.router_role):
            owner, _, attr = role.rpartition(".")
            p = getattr(getattr(module, owner, None), attr, None)
            if isinstance(p, nn.Parameter):
                found[role] = p
        return found

    def unsupported(self, module: nn.Module) -> str | None:
        cls = type(module).__name__
        name = self.router_role.split(".")[0]
        experts, router = getattr(module, "experts", None), getattr(module, name, None)
        if experts is None or router is None:
            return f"{cls} has no 'experts' and '{name}' submodules"
        gate_up = getattr(experts, "gate_up_proj", None)
        down = getattr(experts, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
            return f"{cls}: experts without 3-D gate_up_proj and down_proj parameters"
        n_exp, two_i, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
        layout = {
            "has_gate": True,
            "has_bias": False,
            "is_transposed": False,
            "is_concatenated": True,
            "has_post_expert_norm": False,
        }
        if (
            gate_up.dim() != 3
            or tuple(down.shape) != (n_exp, hidden, two_i // 2)
            or two_i % 2
            or any(getattr(experts, k, v) != v for k, v in layout.items())
            or not callable(getattr(experts, "act_fn", None))
            or any(True for c in experts.children() for _ in c.parameters())
            or len(list(experts.parameters(recurse=False))) != 2
        ):
            return (
                f"{cls}: experts are not the gated, concatenated, bias-free (E, 2I, H) / "
                "(E, H, I) layout this kernel computes"
            )
        params = dict(router.named_parameters(recurse=False))
        weight = params.get("weight")
        if (
            set(params) != {"weight"}
            or weight.shape != (n_exp, hidden)
            or any(True for _ in router.children())
        ):
            return f"{cls}: the router is not one (num_experts, hidden) weight"
        if getattr(module, "jitter_noise", 0):
            return f"{cls}: router jitter noise multiplies the input by fresh noise in training"
        return None

    def touched_rows(self, use: LayerUse) -> torch.Tensor | None:
        if use.role in ROUTERS or use.role in SHARED:
            return None
        _, idx = _route(use.module, use.x)
        return torch.unique(idx)

    def contribution_norm_sum(self, use: LayerUse) -> torch.Tensor:
        """``Σ_t ‖c_t‖``: each token's contribution to the role's gradient (for the experts,
        the sum over its routed experts; a rank-one term's norm is the product of its
        factors' norms)."""
        module, dtype = use.module, torch.float32
        x = use.x.reshape(-1, use.x.shape[-1]).to(dtype)
        b = tokens(use.grad_out, 1, dtype)
        if use.role in SHARED:
            return _shared_contribution_norms(use, x, b).sum(dtype=torch.float64)
        w, idx = _route(module, use.x)
        if use.role in ROUTERS:
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            xr = use.x.reshape(-1, use.x.shape[-1])  # as the router multiplied it
            for grads in _router_token_grads(module, xr, b, idx, dtype):
                total = total + torch.linalg.vector_norm(grads, dim=1, dtype=torch.float64).sum()
            return total
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        for e in torch.unique(idx).tolist():
            _, left, right = _expert_factors(module.experts, e, use.role, x, b, w, idx, dtype)
            norms = left.norm(dim=1, dtype=torch.float64) * right.norm(dim=1, dtype=torch.float64)
            total = total + norms.sum()
        return total

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        module = use.module
        experts = module.experts
        x = use.x.reshape(-1, use.x.shape[-1])
        w, idx = _route(module, use.x)
        k = use.num_sequences
        seq = torch.where(use.seg.token_seq >= 0, use.seg.token_seq, k)
        b = tokens(use.grad_out, 1, dtype)
        if use.role in ROUTERS:
            return _router_seq_grads(module, x, b, w, idx, seq, k, dtype)[:, rows]
        if use.role in SHARED:
            return _shared_seq_grads(use, x, b, dtype)[:, rows]
        param = experts.gate_up_proj if use.role == GATE_UP else experts.down_proj
        if isinstance(rows, slice):
            rows = torch.arange(param.shape[0], device=x.device)[rows]
        out = use.empty(k + 1, rows.numel(), *param.shape[1:], dtype=dtype)
        xf = x.to(dtype)
        for i, e in enumerate(rows.tolist()):
            t, left, right = _expert_factors(experts, e, use.role, xf, b, w, idx, dtype)
            out[:, i] = outer_by_group(left, right, seq[t], k + 1)
        return out


def _expert_factors(
    experts: nn.Module,
    e: int,
    role: str,
    x: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, left, right)``: the tokens routed to expert ``e`` and, per routed token, the
    factors of its rank-one contribution ``left ⊗ right`` to the ``role`` slice of expert ``e``
    (module docstring), in ``dtype``; ``x: (N, H)`` in ``dtype``."""
    t, j = (idx == e).nonzero(as_tuple=True)
    h, bt, wt = x[t], b[t], w[t, j].to(dtype)[:, None]
    g, v = (h @ experts.gate_up_proj[e].to(dtype).T).chunk(2, dim=-1)
    act_g, act_vjp = torch.func.vjp(experts.act_fn, g)
    if role == DOWN:
        return t, wt * bt, act_g * v
    da = wt * (bt @ experts.down_proj[e].to(dtype))
    return t, torch.cat([act_vjp(da * v)[0], da * act_g], dim=-1), h


@register("transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock")
class SharedExpertMoeKernel(SparseMoeKernel):
    """Qwen2-MoE: the sparse block's experts and router, and its gated shared expert."""

    def roles(self, module: nn.Module) -> dict[str, nn.Parameter]:
        found = super().roles(module)
        for role in SHARED:
            try:
                p = module.get_parameter(role)
            except AttributeError:
                continue
            found[role] = p
        return found

    def unsupported(self, module: nn.Module) -> str | None:
        reason = super().unsupported(module)
        if reason is not None:
            return reason
        cls = type(module).__name__
        shared, scale = (
            getattr(module, "shared_expert", None),
            getattr(module, "shared_expert_gate", None),
        )
        linears = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if (
            not all(type(m) is nn.Linear and m.bias is None for m in (*linears, scale))
            or not callable(getattr(shared, "act_fn", None))
            or scale.out_features != 1
            or any(True for c in shared.children() if c not in linears for _ in c.parameters())
        ):
            return (
                f"{cls}: the shared expert is not three bias-free nn.Linear (gate, up, down) "
                "with a bias-free (1, hidden) nn.Linear gate"
            )
        return None


def _shared_factors(
    use: LayerUse, x: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)``, both per token: the role's gradient is ``Σ_t left_t right_tᵀ`` (module
    docstring), recomputed in ``dtype`` from the block's input ``x: (N, H)`` and output
    gradient ``b: (N, H)``."""
    module = use.module
    shared = module.shared_expert
    xf, b = x.to(dtype), b.to(dtype)
    gate = torch.sigmoid(xf @ module.shared_expert_gate.weight.to(dtype).T)  # σ(z): (N, 1)
    g = xf @ shared.gate_proj.weight.to(dtype).T
    u = xf @ shared.up_proj.weight.to(dtype).T
    act_g, act_vjp = torch.func.vjp(shared.act_fn, g)
    a = act_g * u
    down = shared.down_proj.weight.to(dtype)
    if use.role == SHARED_SCALE:
        return gate * (1 - gate) * (b * (a @ down.T)).sum(-1, keepdim=True), xf  # σ'(z) b · M
    b_shared = gate * b
    if use.role == SHARED_DOWN:
        return b_shared, a
    da = b_shared @ down
    if use.role == SHARED_GATE:
        return act_vjp(da * u)[0], xf
    return da * act_g, xf


def _shared_seq_grads(
    use: LayerUse, x: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``(k + 1, *param.shape)``: per-sequence gradients of one of the shared expert's
    tensors."""
    return outer_by_sequence(*_shared_factors(use, x, b, dtype), use)


def _shared_contribution_norms(use: LayerUse, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N,)``: the norm of each token's contribution to a shared-expert tensor's gradient."""
    left, right = _shared_factors(use, x, b, torch.float32)
    return left.norm(dim=1, dtype=torch.float64) * right.norm(dim=1, dtype=torch.float64)


@register(
    "transformers.models.granitemoe.modeling_granitemoe.GraniteMoeMoE",
    "transformers.models.granitemoeshared.modeling_granitemoeshared.GraniteMoeSharedMoE",
)
class GraniteMoeKernel(SparseMoeKernel):
    """GraniteMoE's block: the same experts, a router named ``router`` whose top-k weights are
    the softmax of the top-k logits (its own forward is differentiated, whatever its math)."""

    router_role = GRANITE_ROUTER


def _router(module: nn.Module) -> nn.Module:
    """The block's router: ``gate`` (Qwen-MoE, Mixtral, OLMoE) or ``router`` (GraniteMoE)."""
    router = getattr(module, "gate", None)
    return module.router if router is None else router


def _autocast(x: torch.Tensor, weight: torch.Tensor) -> contextlib.AbstractContextManager:
    """The autocast the forward ran under, when the capture cast the input to a half type."""
    if x.dtype in _HALF and weight.dtype != x.dtype:
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


def _route(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, idx)``, both ``(N, K)``: the router's weights and experts for every token, from its
    own forward (hooks bypassed) on the block's input, as the block computed them."""
    router = _router(module)
    with torch.no_grad(), _autocast(x, router.weight):
        out = router.forward(x.reshape(-1, x.shape[-1]))
    return out[1], out[2]


def _router_token_grads(
    module: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    idx: torch.Tensor,
    dtype: torch.dtype,
    step: int | None = None,
) -> Iterator[torch.Tensor]:
    """The router weight's per-token gradients, ``(n, E · H)`` for ``n`` consecutive tokens at a
    time (``_TOKEN_CHUNK_BYTES`` each; module docstring)."""
    experts, router = module.experts, _router(module)
    c = torch.zeros(idx.shape, dtype=dtype, device=x.device)  # c_{t,j} = b_t · E_{e_tj}(x_t)
    xf = x.to(dtype)
    for e in torch.unique(idx).tolist():
        t, j = (idx == e).nonzero(as_tuple=True)
        g, v = (xf[t] @ experts.gate_up_proj[e].to(dtype).T).chunk(2, dim=-1)
        y = (experts.act_fn(g) * v) @ experts.down_proj[e].to(dtype).T
        c[t, j] = (b[t] * y).sum(-1)
    weight = router.weight.detach()
    call = _Forward(router)  # the router's math without its hooks

    def inner(theta: torch.Tensor, x_t: torch.Tensor, c_t: torch.Tensor) -> torch.Tensor:
        with _autocast(x_t, theta):
            scores = torch.func.functional_call(call, {"inner.weight": theta}, (x_t[None],))[1]
        return (scores[0].to(dtype) * c_t).sum()

    per_token = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))
    step = max(1, _TOKEN_CHUNK_BYTES // (weight.numel() * max(weight.element_size(), 4)))
    for a in range(0, x.shape[0], step):
        grads = per_token(weight, x[a : a + step], c[a : a + step])
        yield grads.reshape(grads.shape[0], -1).to(dtype)


def _router_seq_grads(
    module: nn.Module,
    x: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    seq: torch.Tensor,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(k + 1, E, H)``: the router weight's per-sequence gradients (module docstring)."""
    weight = _router(module).weight
    total = torch.zeros(k + 1, weight.numel(), dtype=dtype, device=x.device)
    a = 0
    for grads in _router_token_grads(module, x, b, idx, dtype):
        total.index_add_(0, seq[a : a + grads.shape[0]], grads)
        a += grads.shape[0]
    return total.view(k + 1, *weight.shape)
