"""How close correct bf16 runs come to the consistency check's bound, per family and tensor kind.

For each model family (tiny, from ``tests/test_families.py``'s configs; weights perturbed by the
seed) and each seed, two microbatches run in bf16 through ``ProjectedAccumulator``; every
tensor's check records ``mismatch / allowed`` (above 1 is a false alarm). Printed per family:
failed runs, and per tensor kind the largest, 99th-percentile and median ratio.

``python -m benchmarks.bf16_margins --families qwen3 gpt2 --seeds 30`` (from the repository
root; the families need ``transformers``).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch


def margins(family: str, seeds: int, rows: int = 4, length: int = 16) -> tuple[int, dict]:
    """``(failed runs, {tensor kind: sorted ratios})`` over ``seeds`` runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import hf_sequence_losses, row_microbatches
    from test_families import FAMILIES, VOCAB

    from proma_accum import IncompleteSequenceDataError, ProjectedAccumulator, _accumulator

    seen = []
    verify = _accumulator.verify_all

    def record(checks):
        seen.extend(checks)
        return verify(checks)

    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    failed = 0
    _accumulator.verify_all = record
    try:
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = FAMILIES[family]()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            model = model.to(torch.bfloat16)
            gen = torch.Generator().manual_seed(seed)
            mbs = row_microbatches(gen, 2, rows=rows, length=length, vocab=VOCAB)
            for mb in mbs:
                b, t = mb["input_ids"].shape
                mb["position_ids"] = torch.arange(t).expand(b, t)
            seen.clear()
            try:
                with ProjectedAccumulator(model) as acc:
                    for mb in mbs:
                        with acc.microbatch(mb["seq_ids"]):
                            hf_sequence_losses(model, mb).float().sum().backward()
            except IncompleteSequenceDataError:
                failed += 1
            for check in seen:
                if check.ratio is not None:
                    kind = check.name.split(".")[-2] if "norm" in check.name else check.layers[0]
                    by_kind[kind].append(float(check.ratio) / float(check.allowed))
    finally:
        _accumulator.verify_all = verify
    return failed, {k: sorted(v) for k, v in by_kind.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["qwen3", "gpt2", "qwen3-moe"])
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args(argv)
    print("| family | runs | false alarms | tensor kind | checks | max | p99 | median |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for family in args.families:
        failed, by_kind = margins(family, args.seeds)
        for kind, r in sorted(by_kind.items(), key=lambda kv: -kv[1][-1]):
            print(f"| {family} | {args.seeds} | {failed} | {kind} | {len(r)} | {r[-1]:.2f} | "
                  f"{r[int(0.99 * (len(r) - 1))]:.2f} | {r[len(r) // 2]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
