"""A lower bound on PROMA's overhead over plain accumulation, from this machine's own speeds.

Usage (from the repository root)::

    python -m benchmarks.floor                    # the T64 and default workloads
    python -m benchmarks.floor --workloads T64 --rounds 3

Why a bound
-----------
Projecting the running gradient ``A`` of a tensor onto the span of its ``k`` per-sequence
gradients ``g_i`` needs the Gram matrix ``G_ij = ⟨g_i, g_j⟩`` and ``r_i = ⟨g_i, A⟩`` (which
depend on all of ``g``) before the combination ``Σ_i c_i g_i`` can be formed. So every
implementation touches the per-sequence gradients at least twice, in one of three ways:

- *materialise* them (``k × d`` floats for a tensor of ``d`` elements): at least one write
  and one read of ``k × d`` floats, even when the Gram matrix is formed while each block of
  the per-sequence gradients is still in cache;
- *recompute* them: form them once for ``G`` and ``r`` (in place of plain accumulation's
  weight-gradient GEMM) and once more for the combination: at least one extra GEMM of the
  weight gradient's shape (``d_out × N × d_in`` for ``N`` tokens);
- *factored* identities (Linear layers): ``G`` from the token Gram matrices of inputs and
  output gradients plus ``r`` from one GEMM ``A · X`` of the weight gradient's size: again at
  least one extra GEMM of that shape (the combination can share plain's GEMM).

For each covered tensor this script measures the cheaper of "write + read ``k × d`` floats"
and "one weight-gradient GEMM" (only the first for 1-D tensors), with the benchmark's thread
count, on prefaulted buffers (no allocation or page-fault cost), and sums them into a floor
per projected microbatch. A step of ``M`` microbatches projects ``M - 1`` of them (the first
has nothing accumulated yet), so no implementation of these kinds can run a step faster than
``plain + (M - 1) × floor``. Everything else an implementation does (the ``k × k`` algebra,
norms, the consistency check, the padding row, the inner products' extra flops) is left out,
which makes it a lower bound, not an estimate.

A second figure measures, the same way, the data kernels the library itself runs for each
Linear-like weight (:func:`library_kernels`: per-sequence GEMM, its sum, the Gram/inner-product
pass, the combination) beyond plain's weight-gradient GEMM. Its gap to the floor is the price of
general-purpose kernels (a ``k × d`` by ``d × k`` Gram GEMM runs far below the GEMM rate of
plain's weight gradients); its gap to the measured ratio is everything else (the ``k × k``
algebra, per-tensor overhead, allocation).

The plain step time and the measured ratio of ``proma-exact`` come from the benchmark's own
paired, fresh-process rounds (:func:`benchmarks.run.run_workload`); the bound's kernels are
timed afterwards in this process.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/floor.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run import _preload, run_workload
from benchmarks.workloads import Workload, quick_workloads, standard_workloads

MiB = 2**20


@dataclass
class TensorFloor:
    """The cheapest way to touch one tensor's ``k`` per-sequence gradients twice."""

    name: str
    shape: tuple[int, ...]
    memory_s: float  # write + read of k x numel floats
    gemm_s: float | None  # one weight-gradient GEMM (2-D tensors)
    kernels_s: float | None = None  # the library's data kernels beyond plain (2-D tensors)

    @property
    def floor_s(self) -> float:
        return self.memory_s if self.gemm_s is None else min(self.memory_s, self.gemm_s)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and prefault of anything fn writes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensor_floors(wl: Workload, repeats: int) -> list[TensorFloor]:
    """Measure the floor of every tensor ``ProjectedAccumulator`` covers on ``wl``'s model."""
    import torch

    from proma_accum import ProjectedAccumulator

    model = wl.model.build(seed=0)
    params = dict(model.named_parameters())  # tied tensors once
    covered = [n for n in ProjectedAccumulator(model).projected_parameters() if n in params]
    k, tokens = wl.seqs, wl.seqs * wl.seq_len
    floors = []
    cache: dict[tuple, TensorFloor] = {}  # same shape, same speed: measure each shape once
    with torch.no_grad():
        for name in covered:
            shape = tuple(params[name].shape)
            if shape not in cache:
                buf = torch.empty(k, params[name].numel())
                write = _median_time(lambda buf=buf: buf.fill_(0.5), repeats)
                read = _median_time(lambda buf=buf: buf.sum(), repeats)
                gemm = kernels = None
                if len(shape) == 2:
                    grad_out = torch.randn(tokens, shape[0])
                    x = torch.randn(tokens, shape[1])
                    out = torch.empty(shape)
                    gemm = _median_time(
                        lambda g=grad_out, x=x, out=out: torch.mm(g.T, x, out=out), repeats
                    )
                    kernels = library_kernels(grad_out, x, k, repeats) - gemm
                cache[shape] = TensorFloor("", shape, write + read, gemm, kernels)
            floor = cache[shape]
            floors.append(TensorFloor(name, shape, floor.memory_s, floor.gemm_s, floor.kernels_s))
    return floors


# The column block of the library's Gram / inner-product pass on the CPU
# (``_seq_grads._GRAM_BLOCK_BYTES``).
GRAM_BLOCK_BYTES = 8 * MiB


def library_kernels(grad_out, x, k: int, repeats: int) -> float:
    """Seconds of the data kernels the library runs for one Linear-like weight in a projected
    microbatch, timed in isolation on prefaulted buffers: the per-sequence GEMM into a
    ``(k + 1, d_out, d_in)`` buffer (which replaces plain's weight-gradient GEMM), its sum
    (the weight gradient handed to autograd), the cache-blocked pass forming the Gram matrix
    and the inner products, and the one-pass combination ``acc + g + Σ_i w_i g_i``.

    ``grad_out: (N, d_out)``, ``x: (N, d_in)``, ``N = k · T`` tokens in ``k`` equal sequences.
    """
    import torch

    tokens, d_out = grad_out.shape
    d_in = x.shape[1]
    seqs = torch.empty(k + 1, d_out, d_in)
    flat = seqs.view(k + 1, -1)
    acc, out = torch.randn(d_out * d_in), torch.empty(d_out * d_in)
    weights = torch.randn(k)
    per_seq_b = grad_out.view(k, tokens // k, d_out).transpose(1, 2)
    per_seq_x = x.view(k, tokens // k, d_in)

    def form():
        torch.bmm(per_seq_b, per_seq_x, out=seqs[:k])
        seqs[k].zero_()  # no padding tokens

    cols = max(1, GRAM_BLOCK_BYTES // (4 * (k + 1)))

    def gram_and_inner():
        for a in range(0, flat.shape[1], cols):
            block = flat[:k, a : a + cols]
            block @ block.T
            block @ acc[a : a + cols]

    def combination():
        torch.add(acc, acc, out=out)
        out.addmv_(flat[:k].T, weights)

    return sum(
        _median_time(fn, repeats) for fn in (form, lambda: seqs.sum(0), gram_and_inner, combination)
    )


def bandwidth(n_bytes: int, repeats: int) -> tuple[float, float]:
    """``(write, read)`` in bytes per second on one prefaulted float32 buffer."""
    import torch

    buf = torch.empty(n_bytes // 4)
    write = _median_time(lambda: buf.fill_(0.5), repeats)
    read = _median_time(lambda: buf.sum(), repeats)
    return n_bytes / write, n_bytes / read


def _variant(record: dict, name: str) -> dict | None:
    return next((v for v in record["variants"] if v["name"] == name and v["status"] == "ok"), None)


def ratio_bound(wl: Workload, plain_s: float, floors: list[TensorFloor]) -> tuple[float, float]:
    """``(floor per projected microbatch in s, lower bound on the step time ratio)``."""
    per_mb = sum(f.floor_s for f in floors)
    return per_mb, 1 + (wl.microbatches - 1) * per_mb / plain_s


def kernel_bound(wl: Workload, plain_s: float, floors: list[TensorFloor]) -> tuple[float, float]:
    """``(library kernels beyond plain per projected microbatch in s, implied step ratio)``."""
    per_mb = sum(f.kernels_s or 0.0 for f in floors)
    return per_mb, 1 + (wl.microbatches - 1) * per_mb / plain_s


def report(wl: Workload, record: dict, floors: list[TensorFloor]) -> list[str]:
    """Lines describing the floor of one workload next to its measured ratio."""
    plain = _variant(record, "plain")
    exact = _variant(record, "proma-exact")
    if plain is None:
        return [f"{wl.name}: plain did not run ({record['variants'][0].get('errors')})"]
    projected = wl.microbatches - 1
    plain_s = plain["median_s"]
    per_mb, bound = ratio_bound(wl, plain_s, floors)
    kernels_mb, kernels_bound = kernel_bound(wl, plain_s, floors)
    lines = [
        f"## {wl.name}: {wl.description} (k = {wl.seqs}, N = {wl.seqs * wl.seq_len} tokens "
        f"per microbatch; {projected} projected microbatches per step)",
        "",
        "| tensor(s) | shape | count | write+read k·d ms | weight GEMM ms | floor ms "
        "| library kernels − GEMM ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[TensorFloor]] = {}
    for f in floors:
        groups.setdefault(f.shape, []).append(f)
    for shape, fs in sorted(groups.items(), key=lambda kv: -sum(f.floor_s for f in kv[1])):
        first = fs[0]
        label = first.name if len(fs) == 1 else f"{first.name} and {len(fs) - 1} more"
        gemm = "n/a" if first.gemm_s is None else f"{1e3 * first.gemm_s:.2f}"
        kern = "n/a" if first.kernels_s is None else f"{1e3 * len(fs) * first.kernels_s:.1f}"
        lines.append(
            f"| {label} | {'×'.join(map(str, shape))} | {len(fs)} "
            f"| {1e3 * first.memory_s:.2f} | {gemm} | {1e3 * sum(f.floor_s for f in fs):.1f} "
            f"| {kern} |"
        )
    lines += [
        "",
        f"- floor per projected microbatch: {1e3 * per_mb:.1f} ms; plain step "
        f"{plain_s:.3f} s (median of {len(plain['times_s'])} rounds)",
        f"- lower bound on the step time ratio: 1 + {projected} × {1e3 * per_mb:.1f} ms / "
        f"{1e3 * plain_s:.0f} ms = **{bound:.3f}×**",
        f"- the library's data kernels alone (no k × k algebra, no per-tensor overhead, 1-D "
        f"tensors free): {1e3 * kernels_mb:.1f} ms per projected microbatch beyond plain's "
        f"GEMMs, i.e. **{kernels_bound:.3f}×**",
    ]
    if exact is not None and exact["ratio_vs_plain"] is not None:
        ratio = exact["ratio_vs_plain"]
        extra = (ratio - 1) * plain_s / projected
        lines.append(
            f"- measured proma-exact: {ratio:.3f}× ({1e3 * extra:.0f} ms extra per projected "
            f"microbatch = {extra / per_mb:.1f} × the floor)"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workloads", nargs="+", default=["T64", "default"], metavar="NAME")
    p.add_argument("--quick", action="store_true", help="tiny model (seconds; smoke test)")
    p.add_argument("--rounds", type=int, help="paired rounds (default: the workload's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 2; 1 with --quick)")
    p.add_argument("--repeats", type=int, default=15, help="timings per kernel (median)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    catalogue = quick_workloads() if args.quick else standard_workloads()
    unknown = [n for n in args.workloads if n not in catalogue]
    if unknown:
        print(f"unknown workload(s) {unknown}; choose from {list(catalogue)}", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.quick else 2)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    variants = ["plain", "proma-exact"]
    _preload(variants)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    records = {}
    for name in args.workloads:  # every fresh-process round before any tensor op here
        wl = catalogue[name]
        log(f"[{wl.name}] timing {', '.join(variants)}")
        records[name] = run_workload(
            wl,
            variants,
            args.rounds or wl.rounds,
            track_memory=False,
            threads=threads,
            timeout=1800.0,
            quiet_wait=0 if args.quick else 5,
            ctx=ctx,
            log=log,
        )

    import torch

    torch.set_num_threads(threads)
    write_bw, read_bw = bandwidth(256 * MiB, args.repeats)
    print(
        f"{threads} thread(s); streaming on a prefaulted 256 MiB buffer: write "
        f"{write_bw / 1e9:.1f} GB/s (fill_), read {read_bw / 1e9:.1f} GB/s (sum)\n"
    )
    for name in args.workloads:
        wl = catalogue[name]
        log(f"[{wl.name}] timing the floor's kernels")
        print("\n".join(report(wl, records[name], tensor_floors(wl, args.repeats))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
