"""Run every (method, seed) of the experiment, in parallel worker processes when asked."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import platform
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch
import transformers
from tqdm import tqdm

from ._experiment import METHODS, DemoConfig, initial_policy, train_method

# The projected methods cost the most per step: start them first to balance the workers.
_COST = {"proma": 2, "proma-exact": 2, "proma-unitadv": 2}


def _train_job(cfg: DemoConfig, method: str, seed: int, state: dict, queue) -> dict:
    return train_method(cfg, method, seed, state, on_step=lambda: queue.put(1))


def run_experiment(cfg: DemoConfig, *, progress: bool = True) -> dict:
    """Warm-start one initial policy per seed, train every method from it, collect metrics.

    Returns ``{"config", "created", "environment", "runtime_s", "steps", "warm_start",
    "metrics"}`` where ``metrics[method][name]`` is a list over seeds of lists over steps
    (``steps + 1`` values each, index 0 = the initial policy).
    """
    cfg.validate()
    t0 = time.perf_counter()
    seeds = list(range(cfg.seeds))
    jobs = sorted(((m, s) for s in seeds for m in cfg.methods), key=lambda j: -_COST.get(j[0], 1))
    bar = tqdm(total=len(jobs) * cfg.steps, desc="PROMA demo", unit="step", disable=not progress)
    warm: dict[int, dict] = {}
    runs: dict[tuple[str, int], dict] = {}
    try:
        if cfg.workers <= 1:
            for s in seeds:
                warm[s] = initial_policy(cfg, s)
            for m, s in jobs:
                runs[m, s] = train_method(
                    cfg, m, s, warm[s]["state_dict"], on_step=lambda: bar.update(1)
                )
        else:
            _run_parallel(cfg, seeds, jobs, warm, runs, bar)
    finally:
        bar.close()
    return {
        "config": cfg.to_dict(),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
        },
        "runtime_s": time.perf_counter() - t0,
        "methods": list(cfg.methods),
        "method_update_rules": {m: METHODS[m] for m in cfg.methods},
        "seeds": seeds,
        "steps": list(range(cfg.steps + 1)),
        "warm_start": {
            str(s): {"steps": w["steps"], "train_reward": w["train_reward"]}
            for s, w in warm.items()
        },
        "metrics": {
            m: {k: [runs[m, s][k] for s in seeds] for k in runs[m, seeds[0]]} for m in cfg.methods
        },
    }


def _run_parallel(cfg, seeds, jobs, warm, runs, bar) -> None:
    """Warm starts first; each seed's training jobs start as soon as its warm start is done."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        pending: dict[Future, tuple] = {
            pool.submit(initial_policy, cfg, s): ("warm", s) for s in seeds
        }
        try:
            while pending:
                done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get())
                for fut in done:
                    kind, *key = pending.pop(fut)
                    if kind == "warm":
                        s = key[0]
                        warm[s] = fut.result()
                        for m, js in jobs:
                            if js == s:
                                job = pool.submit(
                                    _train_job, cfg, m, s, warm[s]["state_dict"], queue
                                )
                                pending[job] = ("train", m, s)
                    else:
                        runs[tuple(key)] = fut.result()
            while not queue.empty():
                bar.update(queue.get())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
