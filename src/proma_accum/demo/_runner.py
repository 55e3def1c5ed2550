"""Run every (method, seed) of the experiment, in parallel worker processes when asked."""

from __future__ import annotations

import datetime
import math
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


class Progress:
    """What the demo is doing, for a person watching it.

    A bar over the training steps, labelled with what is in flight ("warm start seed 2",
    "proma seed 0", ...), and one printed line per finished warm start and run (printed with
    the bar off too). The bar's clock starts at the first training step and its rate is the
    average since then, so the warm starts (no steps) do not make the ETA absurd.
    """

    def __init__(self, total_steps: int, *, bar: bool = True, file=None) -> None:
        self._bar = tqdm(
            total=total_steps, desc="PROMA demo", unit="step", smoothing=0, disable=not bar,
            file=file, dynamic_ncols=True,
        )  # fmt: skip
        self._enabled = bar
        self._file = file
        self._running: list[str] = []
        self._trained = False
        self._t0: dict[str, float] = {}

    def _label(self) -> None:
        self._bar.set_description_str(", ".join(self._running) or "PROMA demo", refresh=True)

    def _say(self, line: str) -> None:
        if self._enabled:
            self._bar.write(line, file=self._file)
        else:
            print(line, file=self._file, flush=True)

    def started(self, name: str) -> None:
        self._running.append(name)
        self._t0[name] = time.perf_counter()
        self._label()

    def finished(self, name: str, detail: str) -> None:
        self._running.remove(name)
        seconds = time.perf_counter() - self._t0.pop(name)
        self._say(f"done: {name} ({seconds:.0f} s): {detail}")
        self._label()

    def step(self, n: int = 1) -> None:
        if not self._trained:  # training starts now: restart the clock of the ETA
            self._trained = True
            self._bar.reset()
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _warm_name(seed: int) -> str:
    return f"warm start seed {seed}"


def _run_name(method: str, seed: int) -> str:
    return f"{method} seed {seed}"


def _warm_detail(warm: dict) -> str:
    return f"{warm['steps']} supervised steps, train reward {warm['train_reward']:.2f}"


def _run_detail(run: dict) -> str:
    finals = [x for x in run["val_reward"][-3:] if x is not None and not math.isnan(x)]
    final = sum(finals) / len(finals) if finals else math.nan
    return f"{len(run['val_reward']) - 1} steps, validation reward {final:.3f} (last 3 steps)"


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
    bar = Progress(len(jobs) * cfg.steps, bar=progress)
    warm: dict[int, dict] = {}
    runs: dict[tuple[str, int], dict] = {}
    try:
        if cfg.workers <= 1:
            for s in seeds:
                bar.started(_warm_name(s))
                warm[s] = initial_policy(cfg, s)
                bar.finished(_warm_name(s), _warm_detail(warm[s]))
            for m, s in jobs:
                bar.started(_run_name(m, s))
                runs[m, s] = train_method(cfg, m, s, warm[s]["state_dict"], on_step=bar.step)
                bar.finished(_run_name(m, s), _run_detail(runs[m, s]))
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


def _run_parallel(cfg, seeds, jobs, warm, runs, bar: Progress) -> None:
    """Warm starts first; each seed's training jobs start as soon as its warm start is done.

    A job is labelled once the pool hands it to a worker (its future is running)."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(cfg.workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        pending: dict[Future, tuple[str, str, int]] = {}  # future -> (label, method, seed)
        for s in seeds:
            pending[pool.submit(initial_policy, cfg, s)] = (_warm_name(s), "", s)
        labelled: set[Future] = set()
        try:
            while pending:
                done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.step(queue.get())
                for fut, (label, _, _) in pending.items():
                    if fut not in labelled and (fut.running() or fut in done):
                        labelled.add(fut)
                        bar.started(label)
                for fut in done:
                    label, method, s = pending.pop(fut)
                    if not method:  # a warm start: its seed's training jobs can start
                        warm[s] = fut.result()
                        bar.finished(label, _warm_detail(warm[s]))
                        for m, js in jobs:
                            if js == s:
                                job = pool.submit(
                                    _train_job, cfg, m, s, warm[s]["state_dict"], queue
                                )
                                pending[job] = (_run_name(m, s), m, s)
                    else:
                        runs[method, s] = fut.result()
                        bar.finished(label, _run_detail(runs[method, s]))
            while not queue.empty():
                bar.step(queue.get())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
