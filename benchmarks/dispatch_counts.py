"""ATen operators and host synchronisations of one microbatch's backward, counted on any device.

A ``TorchDispatchMode`` sees every ATen operator the backward runs. Each operator is one kernel
launch on a GPU; these count as host synchronisations (the CPU waits for the device):

* ``aten::_local_scalar_dense`` — ``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``;
* ``aten::nonzero``, ``aten::_unique2`` / ``unique_*``, ``aten::masked_select`` and indexing
  with a boolean mask — their output size depends on the data;
* ``aten::_linalg_eigh`` / ``linalg_eigvalsh`` — torch's eigensolvers check their error code
  on the host ("When inputs are on a CUDA device, this function synchronizes that device with
  the CPU", the torch docs) — listed apart, since on CPU the check reads memory directly.

The workload: a tiny Qwen3 built from a config (hidden 32, vocab 61), ``k = 8`` sequences of
32 tokens per microbatch, the backward of the second microbatch of a step (the first is plain
accumulation: nothing to project yet), under the precision policy GPUs run (on the CPU the
library may read values on the host, where that costs nothing: see ``_seq_grads``), with a
GPU's column blocks (a CPU's are cache-sized).
``python -m benchmarks.dispatch_counts`` prints the table.
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from proma_accum import ProjectedAccumulator, _seq_grads

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select", "repeat_interleave"}  # fmt: skip
_EIGH_OPS = {"_linalg_eigh", "linalg_eigvalsh", "linalg_eigh"}
# Operators that launch no kernel on a GPU besides views: allocation, metadata, the host read.
_NO_KERNEL_OPS = {"empty", "empty_strided", "promote_types", "result_type", "lift_fresh",
                  "_local_scalar_dense", "detach", "alias"}  # fmt: skip


class CountOps(TorchDispatchMode):
    """Counts ATen operators, host synchronisations and eigensolver calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels = 0  # operators that launch a kernel on a GPU (not views, not metadata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if not func.is_view and name not in _NO_KERNEL_OPS:
            self.kernels += 1
        if name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else ())
            if i is not None
        ):
            self.ops["index(bool mask)"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(n for op, n in self.ops.items() if op != "index(bool mask)")

    @property
    def syncs(self) -> int:
        return sum(self.ops[o] for o in _SYNC_OPS) + self.ops["index(bool mask)"]

    @property
    def eigh(self) -> int:
        return sum(self.ops[o] for o in _EIGH_OPS)


@dataclass
class Counts:
    layers: int
    projection: str
    projected_tensors: int
    plain_ops: int
    proma_ops: int
    proma_syncs: int
    proma_eigh: int
    exit_syncs: int
    plain_kernels: int = 0
    proma_kernels: int = 0

    @property
    def extra_ops_per_tensor(self) -> float:
        return (self.proma_ops - self.plain_ops) / self.projected_tensors

    @property
    def extra_kernels_per_tensor(self) -> float:
        """Extra operators that launch a kernel (views and metadata operators left out)."""
        return (self.proma_kernels - self.plain_kernels) / self.projected_tensors


def _model(layers: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")


def count(layers: int = 1, projection: str = "exact", k: int = 8, tokens: int = 32) -> Counts:
    """Counts for the backward of the second microbatch (and of the context exit), under the
    device precision policy."""
    policy = _seq_grads.HOST_DECISIONS_ON_CPU
    blocks = dict(_seq_grads._GRAM_BLOCK_BYTES)
    _seq_grads.HOST_DECISIONS_ON_CPU = False
    _seq_grads._GRAM_BLOCK_BYTES.pop("cpu", None)  # the column blocks of a GPU
    try:
        return _count(layers, projection, k, tokens)
    finally:
        _seq_grads.HOST_DECISIONS_ON_CPU = policy
        _seq_grads._GRAM_BLOCK_BYTES.update(blocks)


def _count(layers: int, projection: str, k: int, tokens: int) -> Counts:

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 61, (k, tokens), generator=gen) for _ in range(2)]
    seq_ids = torch.arange(k)
    model = _model(layers)
    # plain PyTorch: the same backward, no accumulator
    _loss(model, batches[0]).backward()
    loss = _loss(model, batches[1])
    with CountOps() as plain:
        loss.backward()
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, projection=projection) as acc:
        with acc.microbatch(seq_ids):
            _loss(model, batches[0]).backward()
        mb = acc.microbatch(seq_ids)
        mb.__enter__()
        loss = _loss(model, batches[1])
        with CountOps() as proma:
            loss.backward()
        with CountOps() as exit_ops:
            mb.__exit__(None, None, None)
        projected = len(acc.projected_parameters())
    return Counts(layers, projection, projected, plain.total, proma.total, proma.syncs,
                  proma.eigh, exit_ops.syncs, plain.kernels, proma.kernels)  # fmt: skip


def algebra_launches(k: int = 8, compile: bool = True) -> list[str]:
    """The kernels one update's ``k × k`` algebra (``_proma.update_weights``) runs, eager or
    compiled (``ProjectedAccumulator(compile=True)``), from ``torch.profiler``: each top-level
    ATen operator but views and host-side ones, and each kernel Inductor generated (a dispatch
    mode cannot count these: ``torch.compile`` does not run under one)."""
    import torch._inductor.config as inductor_config

    from proma_accum._compiled import compiler
    from proma_accum._proma import update_weights

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(k, 64, dtype=torch.float64, generator=gen)
    args = (s @ s.T, s @ torch.randn(64, dtype=torch.float64, generator=gen), s.sum(0).norm())
    settings = {"projection": "exact", "relative_bound": 0.5, "removed_factor": 1.0}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        if compile:
            solve = compiler(*settings.values(), torch.device("cpu"))(update_weights)
        else:
            solve = functools.partial(update_weights, **settings)
        solve(*args)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            solve(*args)
    return _launches(prof)


def _launches(prof) -> list[str]:
    """The kernels a profiled region ran: each outermost ATen operator but views and host-side
    ones (the operators it calls are its own), and each kernel Inductor generated."""
    launches: list[str] = []

    def visit(event) -> None:
        if event.name.startswith("aten::"):
            name = event.name.removeprefix("aten::")
            op = getattr(torch.ops.aten, name, None)
            overloads = [getattr(op, o) for o in op.overloads()] if op is not None else []
            view = bool(overloads) and all(o.is_view for o in overloads)
            if not view and name not in _NO_KERNEL_OPS | {"item"}:
                launches.append(event.name)
            return
        if "cpp_fused" in event.name:
            launches.append(event.name)
            return
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return launches


def profiled_kernels(layers: int = 4, projection: str = "exact", compile: bool = False) -> float:
    """Extra kernels per projected tensor in the backward of the second microbatch (the
    workload of :func:`count`), counted with ``torch.profiler`` — which, unlike a dispatch
    mode, sees inside ``compile=True``'s compiled code — under the device precision policy."""
    import torch._inductor.config as inductor_config

    policy = _seq_grads.HOST_DECISIONS_ON_CPU
    blocks = dict(_seq_grads._GRAM_BLOCK_BYTES)
    _seq_grads.HOST_DECISIONS_ON_CPU = False
    _seq_grads._GRAM_BLOCK_BYTES.pop("cpu", None)
    try:
        with inductor_config.patch({"cpp.enable_kernel_profile": True}):
            return _profiled_kernels(layers, projection, compile)
    finally:
        _seq_grads.HOST_DECISIONS_ON_CPU = policy
        _seq_grads._GRAM_BLOCK_BYTES.update(blocks)


def _profiled_kernels(layers: int, projection: str, compile: bool) -> float:
    gen = torch.Generator().manual_seed(0)
    k, tokens = 8, 32
    batches = [torch.randint(0, 61, (k, tokens), generator=gen) for _ in range(3)]
    seq_ids = torch.arange(k)
    model = _model(layers)
    activities = [torch.profiler.ProfilerActivity.CPU]
    _loss(model, batches[0]).backward()
    loss = _loss(model, batches[1])
    with torch.profiler.profile(activities=activities) as plain:
        loss.backward()
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, projection=projection, compile=compile) as acc:
        for batch in batches[:2]:  # the second compiles what the third runs
            with acc.microbatch(seq_ids):
                _loss(model, batch).backward()
        with acc.microbatch(seq_ids):
            loss = _loss(model, batches[2])
            with torch.profiler.profile(activities=activities) as proma:
                loss.backward()
        projected = len(acc.projected_parameters())
    return (len(_launches(proma)) - len(_launches(plain))) / projected


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    print("| model | projection | projected tensors | ATen ops, plain | with PROMA | extra ops "
          "per projected tensor | of which launch a kernel | host syncs in the backward | "
          "at the context exit | eigensolver calls (a sync each on CUDA) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    exact = None
    for layers in args.layers:
        for projection in ("exact", "gs2"):
            c = count(layers, projection)
            exact = c if projection == "exact" else exact
            print(f"| {layers} layer{'s' if layers > 1 else ''} | {projection} | "
                  f"{c.projected_tensors} | {c.plain_ops} | {c.proma_ops} | "
                  f"{c.extra_ops_per_tensor:.0f} | {c.extra_kernels_per_tensor:.0f} | "
                  f"{c.proma_syncs} | {c.exit_syncs} | "
                  f"{c.proma_eigh} |")  # fmt: skip
    eager, compiled = algebra_launches(compile=False), algebra_launches(compile=True)
    print(f"\nThe k × k algebra of one update (k = 8), counted with torch.profiler: {len(eager)} "
          f"kernels eager, {len(compiled)} with compile=True ({', '.join(compiled)}).")  # fmt: skip
    print(f"Counted with torch.profiler over the whole backward ({exact.layers} layer(s), exact): "
          f"{profiled_kernels(exact.layers):.0f} extra kernels per projected tensor eager, "
          f"{profiled_kernels(exact.layers, compile=True):.0f} with compile=True (whose "
          "passes and algebra are one compiled function for a tensor whose per-sequence "
          "gradients fit one chunk and need no check).")  # fmt: skip


if __name__ == "__main__":
    main()
