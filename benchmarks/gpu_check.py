"""One-command check on a GPU: correctness of every layer kind, then plain vs PROMA per step.

``python -m benchmarks.gpu_check`` (a CUDA device, under 5 minutes on one GPU):

1. **Correctness**: for every layer kind (Linear, Embedding, LayerNorm, RMSNorm, transformers'
   Conv1D and Qwen3RMSNorm, tied weights), three microbatches through
   ``ProjectedAccumulator`` against ``proma_accum.testing.reference_accumulate`` on the
   device, in float32 and in bf16; prints each kind's worst relative error per tensor.
2. **Speed and memory**: a Qwen3-0.6B-shaped model built from a config (hidden 1024, 28
   layers, vocab 151936 tied, bf16), 4 microbatches × 8 sequences × 1024 tokens per optimizer
   step; plain accumulation vs PROMA (``exact``, ``gs2``, and ``exact`` with ``compile=True``)
   in alternating rounds; prints the median step time and peak memory of each, their ratios to
   plain from the same rounds, and the warm-up step's time (compilation included).
3. **Counts**: ATen operators (kernel launches) and host synchronisations of one microbatch's
   backward, and at the context exit (``benchmarks.dispatch_counts``); on CUDA also the
   synchronising calls CUDA's sync debug mode reports (syncs inside operators included).

``--device cpu --small`` runs the same script on a small model in seconds (the test suite does,
so it never rots); its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.dispatch_counts import CountOps
from benchmarks.workloads import (
    TINY_MODEL,
    LayerKindModel,
    Microbatch,
    ModelSpec,
    Workload,
    reinforce_loss,
    tokens_in_loss,
)
from proma_accum import ProjectedAccumulator, _seq_grads
from proma_accum.testing import reference_accumulate

QWEN3_06B = ModelSpec(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
)
KINDS = ("linear", "embedding", "layer_norm", "rms_norm", "conv1d", "hf_rms_norm", "tied")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _sequence_losses(model: nn.Module, mb: dict) -> torch.Tensor:
    logp = torch.log_softmax(model(mb["ids"]).float(), -1)
    token_nll = -logp[:, :-1].gather(-1, mb["ids"][:, 1:, None])[..., 0]
    return token_nll.sum(1)  # one sequence per row, in row order


def check_kinds(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Worst relative error per tensor of each layer kind against the reference."""
    errors = {}
    for kind in KINDS:
        torch.manual_seed(0)
        layer = kind if kind not in ("embedding", "tied") else "linear"
        model = LayerKindModel(layer, vocab=53, d=16, tied=kind == "tied").to(device, dtype)
        gen = torch.Generator().manual_seed(1)
        mbs = [{"ids": torch.randint(0, 53, (4, 12), generator=gen).to(device)} for _ in range(3)]
        expected = reference_accumulate(model, mbs, _sequence_losses)
        model.zero_grad(set_to_none=True)
        with ProjectedAccumulator(model) as acc:
            for mb in mbs:
                with acc.microbatch(torch.arange(4, device=device)):
                    _sequence_losses(model, mb).sum().backward()
        worst = 0.0
        for name, p in model.named_parameters():
            want = expected[name]
            err = float((p.grad.double() - want).norm() / want.norm().clamp(min=1e-30))
            worst = max(worst, err)
        errors[kind] = worst
    return errors


def _to(mb: Microbatch, device: torch.device) -> Microbatch:
    return Microbatch(
        **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(mb).items()}
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def time_steps(
    spec: ModelSpec, workload: Workload, device: torch.device, dtype: torch.dtype, rounds: int
) -> dict[str, dict[str, float]]:
    """Median step time (s) and peak memory (MiB) of plain and PROMA, alternating rounds."""
    model = spec.build().to(device, dtype)
    batches = [_to(mb, device) for mb in workload.make_batches()]
    n_tokens = tokens_in_loss(batches)

    def plain() -> None:
        for mb in batches:
            reinforce_loss(model, mb, n_tokens).backward()

    def proma(projection: str, compile: bool = False) -> Callable[[], None]:
        acc = ProjectedAccumulator(model, projection=projection, compile=compile)

        def step() -> None:
            with acc:
                for mb in batches:
                    with acc.microbatch(mb.seq_ids):
                        reinforce_loss(model, mb, n_tokens).backward()

        return step

    variants = {
        "plain": plain,
        "proma-exact": proma("exact"),
        "proma-gs2": proma("gs2"),
        "proma-exact-compiled": proma("exact", compile=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, float] = {}  # the warm-up step (compilation included)
    peaks: dict[str, float] = dict.fromkeys(variants, 0.0)
    for r in range(rounds + 1):  # round 0 warms up
        for name, step in variants.items():
            model.zero_grad(set_to_none=True)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - start)
                peaks[name] = max(peaks[name], _peak(device))
            else:
                first[name] = time.perf_counter() - start
    out = {}
    for name in variants:
        ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
        out[name] = {
            "step_s": statistics.median(times[name]),
            "ratio": statistics.median(ratios),
            "peak_mib": peaks[name],
            "first_step_s": first[name],
        }
    return out


def count_microbatch(
    spec: ModelSpec, workload: Workload, device: torch.device, dtype: torch.dtype
) -> dict[str, int]:
    """ATen ops and host syncs of the second microbatch's backward (and the context exit), under
    the precision policy GPUs run (on CPU too, for the small check)."""
    policy = _seq_grads.HOST_DECISIONS_ON_CPU
    _seq_grads.HOST_DECISIONS_ON_CPU = False
    try:
        return _count_microbatch(spec, workload, device, dtype)
    finally:
        _seq_grads.HOST_DECISIONS_ON_CPU = policy


def _count_microbatch(
    spec: ModelSpec, workload: Workload, device: torch.device, dtype: torch.dtype
) -> dict[str, int]:
    model = spec.build().to(device, dtype)
    batches = [_to(mb, device) for mb in workload.make_batches(microbatches=2)]
    n_tokens = tokens_in_loss(batches)
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(batches[0].seq_ids):
            reinforce_loss(model, batches[0], n_tokens).backward()
        mb = acc.microbatch(batches[1].seq_ids)
        mb.__enter__()
        loss = reinforce_loss(model, batches[1], n_tokens)
        with warnings.catch_warnings(record=True) as caught, CountOps() as backward:
            warnings.simplefilter("always")
            if device.type == "cuda":  # also the syncs inside operators (e.g. a solver's check)
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loss.backward()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        with CountOps() as exit_ops:
            mb.__exit__(None, None, None)
        projected = len(acc.projected_parameters())
    return {
        "projected_tensors": projected,
        "ops": backward.total,
        "syncs": backward.syncs,
        "eigh": backward.eigh,
        "exit_syncs": exit_ops.syncs,
        # CUDA's own count of synchronising calls in the backward (None off CUDA).
        "cuda_syncs": (
            sum("synchroniz" in str(w.message) for w in caught) if device.type == "cuda" else None
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model (seconds on CPU)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small to check the script")
    spec = TINY_MODEL if args.small else QWEN3_06B
    seq_len, seqs, microbatches = (16, 4, 2) if args.small else (1024, 8, 4)
    workload = Workload(
        "gpu-check", "gpu check", seq_len, seqs, microbatches=microbatches, model=spec
    )
    started = time.time()
    print(f"# proma_accum GPU check on {device} (torch {torch.__version__})\n")
    print("| layer kind | float32 error | bf16 error |\n|---|---:|---:|")
    kinds = {dt: check_kinds(device, dt) for dt in (torch.float32, torch.bfloat16)}
    ok = True
    for kind in KINDS:
        e32, e16 = kinds[torch.float32][kind], kinds[torch.bfloat16][kind]
        ok &= e32 <= TOLERANCE[torch.float32] and e16 <= TOLERANCE[torch.bfloat16]
        print(f"| {kind} | {e32:.1e} | {e16:.1e} |")
    print(f"\nall within {TOLERANCE[torch.float32]:g} (float32) and "
          f"{TOLERANCE[torch.bfloat16]:g} (bf16): {ok}\n")  # fmt: skip
    timing = time_steps(spec, workload, device, torch.bfloat16, args.rounds)
    print(f"| variant (bf16, {workload.microbatches} × {seqs} × {seq_len} tokens) | step (s) | "
          "ratio to plain | peak memory (MiB) | first step (s), compilation included |\n"
          "|---|---:|---:|---:|---:|")  # fmt: skip
    for name, row in timing.items():
        print(f"| {name} | {row['step_s']:.3f} | {row['ratio']:.2f} | {row['peak_mib']:.0f} | "
              f"{row['first_step_s']:.2f} |")  # fmt: skip
    counts = count_microbatch(spec, workload, device, torch.bfloat16)
    print(f"\nbackward of one microbatch: {counts['ops']} ATen ops, {counts['syncs']} host syncs "
          f"({counts['eigh']} eigensolver calls, a sync each on CUDA), {counts['exit_syncs']} "
          f"at the context exit; {counts['projected_tensors']} projected tensors; "
          f"CUDA's sync debug mode saw {counts['cuda_syncs']} synchronising calls")  # fmt: skip
    print(f"\n{time.time() - started:.0f} s")
    return {"kinds": kinds, "timing": timing, "counts": counts, "ok": ok}


if __name__ == "__main__":
    main()
