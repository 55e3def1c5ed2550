"""The accumulation variants compared by the benchmark.

Each variant runs one optimizer step's worth of microbatch forward/backward passes and leaves
the step's gradient in ``p.grad``; the optimizer update itself is not part of the measurement
(it is the same for every variant).

``plain``
    Ordinary gradient accumulation: ``loss.backward()`` per microbatch.
``proma-exact`` / ``proma-gs2``
    ``proma_accum.ProjectedAccumulator(model, projection=..., clamp=0.5)``, with the forward
    and backward of each microbatch inside ``acc.microbatch(seq_ids)``.
``opacus-materialised``
    What a user with Opacus alone would write: ``opacus.grad_sample.GradSampleHooks``
    (non-wrapping, ``loss_reduction="sum"``) materialises the per-sample gradient of every
    parameter (every layer, embedding included) and keeps all of them until the backward
    ends; then each tensor's running sum is projected onto the complement of the span of its
    per-sequence gradients with a reduced QR, the change is clamped, and the microbatch
    gradient is added. Opacus only records activations of modules in training mode, so this
    variant runs the model in ``train()`` mode; the Qwen3 model has no dropout (attention
    dropout is 0), so the computation is the same. Opacus' per-sample dimension is the row,
    so packed rows (several sequences per row) are not supported.
``loop-style``
    The approach of the paper's demonstration: only ``nn.Linear`` weights are hooked; a
    forward hook keeps the input, a full backward hook forms a Python list of per-sequence
    weight gradients (``g_out^T @ act_in`` over the tokens of each sequence), projects the
    running sum with two normalised Gram-Schmidt passes written as Python loops
    (``project_to_complement_v2`` of the PROMA note), clamps the change and adds the
    microbatch gradient. The running sums live outside ``p.grad`` and are copied into it
    after the last microbatch. As in the demonstration, other parameters keep the plain
    gradient, and the tied ``lm_head`` copy overwrites the embedding's contribution: this
    baseline reproduces the demonstration's cost, not a correct PROMA gradient.

All PROMA-like variants use the note's clamp: the change made to the running sum has norm
at most ``0.5 * ||microbatch gradient||``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .workloads import Microbatch, Workload, reinforce_loss

CLAMP = 0.5


class Variant:
    """Base class: ``setup`` once per model, then ``step`` once per optimizer step."""

    name = "?"

    def unsupported(self, workload: Workload) -> str | None:
        """A reason why the variant cannot run ``workload``, or None."""
        return None

    def setup(self, model: nn.Module, workload: Workload) -> None:
        self.model = model
        self.workload = workload

    def step(self, batches: Sequence[Microbatch], n_tokens: int) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class Plain(Variant):
    """Plain gradient accumulation (the baseline every ratio is taken against)."""

    name = "plain"

    def step(self, batches, n_tokens):
        self.model.zero_grad(set_to_none=True)
        for mb in batches:
            reinforce_loss(self.model, mb, n_tokens).backward()


class Proma(Variant):
    """``proma_accum.ProjectedAccumulator`` with the given projection, clamp 0.5.

    ``keep=False`` (variant ``proma-exact-nokeep``): the CPU workspace keeps no buffer from one
    microbatch to the next (the memory-for-time trade of ``_workspace``, measured).
    """

    def __init__(self, projection: str, keep: bool = True):
        self.projection = projection
        self.keep = keep
        self.name = f"proma-{projection}" + ("" if keep else "-nokeep")

    def setup(self, model, workload):
        from proma_accum import ProjectedAccumulator

        super().setup(model, workload)
        self.acc = ProjectedAccumulator(model, projection=self.projection, clamp=CLAMP)
        if not self.keep:
            self.acc._workspace._keep = lambda t: None  # type: ignore[method-assign]
        self.acc.attach()

    def step(self, batches, n_tokens):
        self.model.zero_grad(set_to_none=True)
        for mb in batches:
            with self.acc.microbatch(mb.seq_ids):
                reinforce_loss(self.model, mb, n_tokens).backward()

    def teardown(self):
        self.acc.detach()


def _quiet_full_backward_hook_warning() -> None:
    # The embedding output feeds the first layers; their inputs need no gradient from the
    # hook's point of view, and torch warns that the full backward hook fires anyway.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")


def _clamped_update(run: torch.Tensor, proj: torch.Tensor, mb_grad: torch.Tensor) -> None:
    """In place: ``run <- run - c proj + mb_grad``, ``c<=1``, ``||c proj|| <= 0.5 ||mb_grad||``."""
    limit = CLAMP * mb_grad.norm()
    norm = proj.norm()
    if norm > limit:
        proj = proj * (limit / norm)
    run.sub_(proj).add_(mb_grad)


class OpacusMaterialised(Variant):
    """Opacus per-sample gradients for every layer, then an exact QR projection per tensor."""

    name = "opacus-materialised"

    def unsupported(self, workload):
        if workload.packed:
            return "Opacus per-sample gradients are per row; packed rows hold several sequences"
        return None

    def setup(self, model, workload):
        from opacus.grad_sample import GradSampleHooks

        super().setup(model, workload)
        _quiet_full_backward_hook_warning()
        model.train()  # Opacus ignores modules in eval mode; the model has no dropout.
        self.hooks = GradSampleHooks(model, loss_reduction="sum")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(self, batches, n_tokens):
        running: dict[int, torch.Tensor] = {}
        for mb in batches:
            for p in self.params:
                p.grad = None
                p.grad_sample = None
            reinforce_loss(self.model, mb, n_tokens).backward()
            # All per-sample gradients now exist at once; project tensor by tensor.
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    mb_grad = p.grad
                    per_seq = p.grad_sample
                    p.grad_sample = None
                    run = running.get(i)
                    if run is None:
                        running[i] = mb_grad
                        continue
                    vecs = per_seq.reshape(per_seq.shape[0], -1).T  # (d, k)
                    q, _ = torch.linalg.qr(vecs, mode="reduced")
                    flat = run.reshape(-1)
                    proj = q @ (q.T @ flat)
                    del q, vecs, per_seq
                    _clamped_update(flat, proj, mb_grad.reshape(-1))
        for i, p in enumerate(self.params):
            p.grad = running[i]

    def teardown(self):
        self.hooks.remove_hooks()
        self.model.eval()


def project_to_complement_v2(acc_vec: torch.Tensor, vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The PROMA note's approximate projection: two normalised Gram-Schmidt passes, in place."""
    units = [v / v.norm() for v in vecs]
    flat = acc_vec.view(-1)
    for _ in range(2):
        for u in units:
            flat -= torch.dot(flat, u.view(-1)) * u.view(-1)
    return acc_vec


class LoopStyle(Variant):
    """The demonstration's approach: Linear weights only, Python lists and loops."""

    name = "loop-style"

    def setup(self, model, workload):
        super().setup(model, workload)
        _quiet_full_backward_hook_warning()
        self.current: Microbatch | None = None
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.running: dict[nn.Module, torch.Tensor] = {}
        self.handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self._keep_input))
                self.handles.append(module.register_full_backward_hook(self._project))

    def _keep_input(self, module, inputs, output):
        if torch.is_grad_enabled() and self.current is not None:
            self.inputs[module] = inputs[0].detach()

    def _per_sequence_grads(self, act: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        mb = self.current
        if not self.workload.packed:
            return [gout[i].T @ act[i] for i in range(act.shape[0])]
        act = act.reshape(-1, act.shape[-1])
        gout = gout.reshape(-1, gout.shape[-1])
        seq = mb.token_seq.reshape(-1)
        grads = []
        for s in range(self.workload.seqs):
            sel = seq == s
            grads.append(gout[sel].T @ act[sel])
        return grads

    @torch.no_grad()
    def _project(self, module, grad_input, grad_output):
        act = self.inputs.pop(module, None)
        if act is None or grad_output[0] is None:
            return
        grads = self._per_sequence_grads(act, grad_output[0])
        mb_grad = grads[0].clone()
        for g in grads[1:]:
            mb_grad += g
        run = self.running.get(module)
        if run is None:
            self.running[module] = mb_grad
            return
        complemented = project_to_complement_v2(run.clone(), grads)
        proj_on_span = run - complemented
        _clamped_update(run, proj_on_span, mb_grad)

    def step(self, batches, n_tokens):
        self.model.zero_grad(set_to_none=True)
        self.running.clear()
        for mb in batches:
            self.current = mb
            reinforce_loss(self.model, mb, n_tokens).backward()
        self.current = None
        with torch.no_grad():
            for module, run in self.running.items():
                if module.weight.grad is None:
                    module.weight.grad = run.clone()
                else:
                    module.weight.grad.copy_(run)
        self.running.clear()

    def teardown(self):
        for h in self.handles:
            h.remove()


def make_variant(name: str) -> Variant:
    """The variant called ``name`` (one of :data:`VARIANTS`)."""
    if name == "plain":
        return Plain()
    if name == "proma-exact-nokeep":
        return Proma("exact", keep=False)
    if name.startswith("proma-"):
        return Proma(name.removeprefix("proma-"))
    if name == "opacus-materialised":
        return OpacusMaterialised()
    if name == "loop-style":
        return LoopStyle()
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


VARIANTS = (
    "plain",
    "proma-exact",
    "proma-gs2",
    "proma-exact-nokeep",
    "opacus-materialised",
    "loop-style",
)
# What the full suite runs when no variants are given (the no-keep variant is on request).
SUITE_VARIANTS = tuple(v for v in VARIANTS if v != "proma-exact-nokeep")
