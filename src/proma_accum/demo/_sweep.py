"""``proma-accum sweep``: trade-off curves of the demo over learning rate and PROMA's settings.

The grid (:class:`SweepSpec`) has two parts:

- the **learning-rate axis**: every method of ``lr_methods`` (GRPO, REINFORCE, PROMA) at every
  learning rate of ``lrs``;
- the **secondary axes**, at ``mid_lr``, PROMA against REINFORCE: microbatches per optimizer
  step, clamp, strength, projection and loss/advantages mode.

Every run is one (method, configuration, seed) of :func:`train_method`. A finished run is
cached on disk under ``<out>/cache/`` as JSON, keyed by a hash of its configuration, method and
seed (warm starts likewise, keyed by what they depend on), so an interrupted sweep resumes where
it stopped and a grid that grows reruns only what is new. :func:`analyse` turns the runs into
``sweep.json``, the figures and ``report.md`` (see ``_sweep_report``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ._experiment import DemoConfig, initial_policy, train_method

#: bump when a change to the training code makes cached runs stale
CACHE_VERSION = 1

#: fields of DemoConfig that the warm start depends on
_WARM_FIELDS = (
    "digits", "probe_size", "hidden_size", "layers", "warm_start_target",
    "warm_start_max_steps", "warm_start_check_every",
)  # fmt: skip


@dataclass
class SweepSpec:
    """The grid. ``base`` holds the DemoConfig fields shared by every run."""

    seeds: int = 5
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    lr_methods: tuple[str, ...] = ("grpo", "reinforce", "proma")
    mid_lr: float = 1e-3
    #: microbatches per optimizer step -> DemoConfig overrides (8 sequences per microbatch)
    accumulation: dict[int, dict] = field(
        default_factory=lambda: {
            4: {"minibatches": 4},
            8: {"minibatches": 2},
            16: {"minibatches": 1},
            32: {"minibatches": 1, "prompts_per_step": 32},
        }
    )
    clamps: tuple[float | None, ...] = (0.25, 0.5, 1.0, 2.0, None)
    strengths: tuple[float, ...] = (0.5, 1.0)
    variants: tuple[str, ...] = ("proma-exact", "proma-unitadv")
    base: dict = field(default_factory=lambda: {"steps": 40, "mechanism_every": 5})

    @classmethod
    def quick(cls) -> SweepSpec:
        """A smoke run of every axis, in well under a minute on two CPU cores."""
        return cls(
            seeds=2,
            lrs=(3e-4, 3e-3),
            mid_lr=3e-3,
            accumulation={2: {"minibatches": 2}, 4: {"minibatches": 1}},
            clamps=(0.5, None),
            strengths=(1.0,),
            variants=("proma-exact",),
            base={
                "steps": 2,
                "mechanism_every": 2,
                "mechanism_sequences": 8,
                "prompts_per_step": 4,
                "probe_size": 16,
                "probe_samples": 1,
                "kl_window": 2,
                "warm_start_target": 0.05,
                "warm_start_max_steps": 25,
            },
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["accumulation"] = {str(k): v for k, v in self.accumulation.items()}
        return d

    def cells(self) -> list[dict]:
        """Every (axis, value, method, overrides) cell; a cell shared by axes appears once per
        axis (its runs are cached and run once)."""
        cells = []
        mid_micro = 8 if 8 in self.accumulation else min(self.accumulation)
        mid = {"lr": self.mid_lr, **self.accumulation[mid_micro]}
        for lr in self.lrs:
            for m in self.lr_methods:
                cells.append({"axis": "lr", "value": lr, "method": m, "overrides": {"lr": lr}})
        for n, ov in self.accumulation.items():
            for m in ("reinforce", "proma"):
                cells.append(
                    {"axis": "accumulation", "value": n, "method": m,
                     "overrides": {"lr": self.mid_lr, **ov}}
                )  # fmt: skip
        for c in self.clamps:
            cells.append(
                {"axis": "clamp", "value": c, "method": "proma", "overrides": {**mid, "clamp": c}}
            )
        for s in self.strengths:
            cells.append(
                {"axis": "strength", "value": s, "method": "proma",
                 "overrides": {**mid, "strength": s}}
            )  # fmt: skip
        for v in ("reinforce", "proma", *self.variants):
            cells.append({"axis": "variant", "value": v, "method": v, "overrides": dict(mid)})
        return cells


def _config(spec: SweepSpec, overrides: dict) -> DemoConfig:
    return DemoConfig(**{**spec.base, **overrides, "seeds": 1, "workers": 1})


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_key(cfg: DemoConfig, method: str, seed: int) -> str:
    d = cfg.to_dict()
    for k in ("methods", "seeds", "workers"):
        d.pop(k)
    return _hash({"v": CACHE_VERSION, "config": d, "method": method, "seed": seed})


def warm_key(cfg: DemoConfig, seed: int) -> str:
    d = cfg.to_dict()
    return _hash({"v": CACHE_VERSION, "warm": {k: d[k] for k in _WARM_FIELDS}, "seed": seed})


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _warm_job(cfg: DemoConfig, seed: int, path: Path) -> dict:
    warm = initial_policy(cfg, seed)
    _write_atomic(path, lambda p: torch.save(warm, p))
    return {"steps": warm["steps"], "train_reward": warm["train_reward"]}


def _run_job(cfg: DemoConfig, method: str, seed: int, warm_path: Path, path: Path) -> float:
    t0 = time.perf_counter()
    warm = torch.load(warm_path, weights_only=False)
    history = train_method(cfg, method, seed, warm["state_dict"])
    record = {
        "method": method,
        "seed": seed,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("methods", "seeds")},
        "warm_start": {"steps": warm["steps"], "train_reward": warm["train_reward"]},
        "seconds": time.perf_counter() - t0,
        "metrics": history,
    }
    _write_atomic(path, lambda p: p.write_text(json.dumps(record)))
    return record["seconds"]


def plan(spec: SweepSpec) -> dict[str, tuple[DemoConfig, str, int]]:
    """``{run key: (config, method, seed)}`` of every distinct run of the grid, in the order
    they run: the learning-rate axis first, then the rest, each seed by seed (so that an
    interrupted sweep leaves complete seeds for the paired comparisons)."""
    runs = {}
    for group in ("lr", "other"):
        cells = [c for c in spec.cells() if (c["axis"] == "lr") == (group == "lr")]
        for seed in range(spec.seeds):
            for cell in cells:
                cfg = _config(spec, cell["overrides"])
                runs.setdefault(run_key(cfg, cell["method"], seed), (cfg, cell["method"], seed))
    return runs


def run_sweep(spec: SweepSpec, out: str | Path, *, workers: int = 2, progress: bool = True) -> dict:
    """Run every run of the grid that is not cached under ``out/cache``; return timing info.

    Runs go to ``workers`` spawned processes (1: inline), most expensive first.
    """
    cache = Path(out) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    runs = plan(spec)
    todo = {k: v for k, v in runs.items() if not (cache / f"run-{k}.json").exists()}
    warm_paths = {}
    for cfg, _, seed in runs.values():
        warm_paths[seed, warm_key(cfg, seed)] = (cfg, cache / f"warm-{warm_key(cfg, seed)}.pt")
    warm_todo = {k: v for k, v in warm_paths.items() if not v[1].exists()}

    order = list(todo.items())
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(warm_todo) + len(order), desc="PROMA sweep", unit="run",
        disable=not progress, dynamic_ncols=True, smoothing=0,
    )  # fmt: skip
    bar.write(
        f"{len(runs)} runs in the grid, {len(runs) - len(todo)} cached, {len(todo)} to run "
        f"(+{len(warm_todo)} warm starts) in {cache}"
    )
    try:
        if workers <= 1:
            for (seed, _), (cfg, path) in warm_todo.items():
                _warm_job(cfg, seed, path)
                bar.update()
            for key, (cfg, method, seed) in order:
                wp = warm_paths[seed, warm_key(cfg, seed)][1]
                _run_job(cfg, method, seed, wp, cache / f"run-{key}.json")
                bar.update()
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                pending = {
                    pool.submit(_warm_job, cfg, seed, path): f"warm start seed {seed}"
                    for (seed, _), (cfg, path) in warm_todo.items()
                }
                while pending:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for fut in done:
                        fut.result()
                        pending.pop(fut)
                        bar.update()
                pending = {}
                for key, (cfg, method, seed) in order:
                    wp = warm_paths[seed, warm_key(cfg, seed)][1]
                    fut = pool.submit(_run_job, cfg, method, seed, wp, cache / f"run-{key}.json")
                    pending[fut] = f"{method} seed {seed}"
                while pending:
                    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                    for fut in done:
                        seconds = fut.result()
                        bar.write(f"done: {pending.pop(fut)} ({seconds:.0f} s)")
                        bar.update()
    finally:
        bar.close()
        if todo:  # the wall time of every invocation that ran something, for the report
            timing = {"ended": now(), "runs": len(runs), "ran": len(todo),
                      "wall_s": time.perf_counter() - t0, "workers": workers}  # fmt: skip
            path = Path(out) / "timing.json"
            history = json.loads(path.read_text()) if path.exists() else []
            _write_atomic(path, lambda p: p.write_text(json.dumps([*history, timing], indent=1)))
    return {"runs": len(runs), "ran": len(todo), "wall_s": time.perf_counter() - t0}


def load_runs(spec: SweepSpec, out: str | Path) -> dict[str, dict]:
    """The cached records of the grid's runs that have finished (missing ones are skipped)."""
    cache = Path(out) / "cache"
    found = {}
    for key in plan(spec):
        path = cache / f"run-{key}.json"
        if path.exists():
            found[key] = json.loads(path.read_text())
    return found


def environment() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
