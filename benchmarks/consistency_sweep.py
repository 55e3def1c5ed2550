"""False positives and detection power of the consistency check, over dtypes, sizes and layers.

The check compares, per projected tensor, ``Σ_i S_i`` (the per-sequence gradients, formed in
float32) with the gradient autograd computed, relative to the latter's norm, against a
tolerance (``_consistency.tolerance``). In reduced precision autograd's own gradient is off by
its rounding errors, so a tolerance too tight kills a correct bf16 run (a false positive),
and one too loose misses a real contribution from outside the hooked layers.

For each sampled setting — hidden size, tokens per sequence, sequences ``k``, the layer kind
between an embedding and an LM head, and the precision (bf16 parameters, fp16 parameters, bf16
or fp16 autocast over float32 parameters, float32 with reduced-precision matmuls) — the script
runs two microbatches of a step and records every tensor's mismatch ratio on the second:

* clean: the plain loss; every failed check is a false positive;
* control: the same loss plus a term whose gradient adds ``outside × ‖g‖`` (default 1%) to
  one tensor's gradient in a fixed random direction, outside every hooked layer; a passed
  check on that tensor is a miss.

``python -m benchmarks.consistency_sweep --microbatches 500`` runs the sweep (``--quick`` a
small slice) and prints per precision: settings, checks, false positives, the largest clean
ratio over its tolerance, and the control's detection rate.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from dataclasses import dataclass

import torch

from benchmarks.workloads import LayerKindModel
from proma_accum import ProjectedAccumulator, _consistency

PRECISIONS = ("bf16-params", "fp16-params", "bf16-autocast", "fp16-autocast", "fp32-reduced-matmul")
LAYERS = ("linear", "layer_norm", "rms_norm", "hf_rms_norm", "conv1d")


@dataclass
class Setting:
    precision: str
    layer: str
    d: int
    tokens: int
    k: int


def _sample(rng: random.Random, precision: str, max_tokens: int) -> Setting:
    d = rng.choice([32, 64, 128, 256, 512, 1024])
    tokens = rng.choice([16, 32, 64, 128, 256, 512, 1024, 2048])
    k = rng.choice([2, 4, 8, 16, 32])
    while tokens * k > max_tokens and (tokens > 16 or k > 2):  # bound the work per setting
        if tokens > 16 and (k <= 2 or rng.random() < 0.5):
            tokens //= 2
        else:
            k //= 2
    return Setting(precision, rng.choice(LAYERS), d, tokens, k)


@contextlib.contextmanager
def _precision(setting: Setting):
    if setting.precision in ("bf16-autocast", "fp16-autocast"):
        dtype = torch.bfloat16 if setting.precision == "bf16-autocast" else torch.float16
        with torch.autocast("cpu", dtype=dtype):
            yield
    elif setting.precision == "fp32-reduced-matmul":
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
    else:
        yield


def run_setting(
    setting: Setting, seed: int, outside: float
) -> list[tuple[str, float, float, bool]]:
    """``[(tensor, ratio, rtol, with_outside)]`` for the second microbatch, clean and control."""
    torch.manual_seed(seed)
    vocab = 97
    model = LayerKindModel(setting.layer, vocab, setting.d)
    if setting.precision == "bf16-params":
        model.to(torch.bfloat16)
    elif setting.precision == "fp16-params":
        model.half()
    ids = [torch.randint(0, vocab, (setting.k, setting.tokens)) for _ in range(2)]
    seq_ids = torch.arange(setting.k)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with _precision(setting):
            logits = model(batch)
        logp = torch.log_softmax(logits.float(), -1)
        return -logp.gather(-1, batch.roll(-1, 1)[..., None]).mean() * setting.k

    target = dict(model.named_parameters())["mid.weight"]
    (plain,) = torch.autograd.grad(loss_of(ids[1]), target)
    direction = torch.randn_like(target, dtype=torch.float32)
    direction *= outside * plain.float().norm() / direction.norm()

    records: list[tuple[str, float, float, bool]] = []
    seen: list[_consistency.Consistency] = []
    real_verify = _consistency.verify_all

    def recording(checks):
        seen.extend(checks)

    for with_outside in (False, True):
        model.zero_grad(set_to_none=True)
        seen.clear()
        _consistency_verify = _consistency.verify_all
        try:
            import proma_accum._accumulator as accumulator

            accumulator.verify_all = recording
            with ProjectedAccumulator(model) as acc:
                with acc.microbatch(seq_ids):
                    loss_of(ids[0]).backward()
                with acc.microbatch(seq_ids):
                    loss = loss_of(ids[1])
                    if with_outside:
                        loss = loss + (target.float() * direction).sum()
                    loss.backward()
        finally:
            accumulator.verify_all = real_verify
            del _consistency_verify
        for c in seen:
            if c.ratio is not None:
                records.append((c.name, float(c.ratio), float(c.allowed), with_outside))
    return records


def sweep(microbatches: int, outside: float, seed: int, max_tokens: int) -> dict[str, dict]:
    rng = random.Random(seed)
    out: dict[str, dict] = {}
    for precision in PRECISIONS:
        stats = {"settings": 0, "checks": 0, "false_positives": 0, "worst": 0.0,
                 "worst_setting": None, "controls": 0, "caught": 0}  # fmt: skip
        while stats["settings"] < microbatches:
            s = _sample(rng, precision, max_tokens)
            for name, ratio, rtol, with_outside in run_setting(s, rng.randrange(10**6), outside):
                if with_outside:
                    if name == "mid.weight":
                        stats["controls"] += 1
                        stats["caught"] += ratio > rtol
                    continue
                stats["checks"] += 1
                stats["false_positives"] += ratio > rtol
                if ratio / rtol > stats["worst"]:
                    stats["worst"], stats["worst_setting"] = ratio / rtol, (s, name)
            stats["settings"] += 1
        out[precision] = stats
        print(f"{precision}: {stats['settings']} settings, {stats['checks']} checks, "
              f"{stats['false_positives']} false positives, worst {stats['worst']:.2f}, "
              f"caught {stats['caught']}/{stats['controls']}", flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=500, help="settings per precision")
    parser.add_argument("--outside", type=float, default=0.01, help="control's relative size")
    parser.add_argument("--max-tokens", type=int, default=8192, help="k × tokens bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 settings per precision")
    args = parser.parse_args(argv)
    n = 10 if args.quick else args.microbatches
    start = time.time()
    results = sweep(n, args.outside, args.seed, 1024 if args.quick else args.max_tokens)
    print(f"| precision | settings | checks | false positives | worst clean ratio / tolerance "
          f"| outside {args.outside:.0%} caught |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for precision, s in results.items():
        print(f"| {precision} | {s['settings']} | {s['checks']} | {s['false_positives']} | "
              f"{s['worst']:.2f} | {s['caught']}/{s['controls']} |")  # fmt: skip
    for precision, s in results.items():
        print(f"worst {precision}: {s['worst_setting']}")
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
