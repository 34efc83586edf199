"""The measuring machinery shared by all parts: statistics, interleaving, timers, the gated Trainer driver.

Run-to-run drift on a shared machine is ~10 % and the load changes within seconds, so every comparison
runs in one process, interleaved in rotating order (A B C, then B C A, ...), and is reduced by medians.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.benchmark import Timer

from flexlora.training.checkpoints import PreemptionCheckpoint

K = TypeVar("K", bound=Hashable)
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


# ------------------------------------------------------------------------------------------------ statistics
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def quartiles(values: Sequence[float]) -> list[float]:
    if len(values) < 2:
        return [float(values[0]), float(values[0])]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def rotation(items: Sequence[K], r: int) -> list[K]:
    """Round r's order: every item leads once per len(items) rounds, so none always runs right after another."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def paired_ratios(values: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Median and IQR of the element-wise ratios of two series measured side by side (same group, same round)."""
    ratios = [a / b for a, b in zip(values, reference, strict=True)]
    return {"median": median(ratios), "iqr": quartiles(ratios), "total": sum(values) / sum(reference)}


# ------------------------------------------------------------------------------------------------ environment
def quiet() -> None:
    """Silence Lightning's tips, transformers' load reports and progress bars: the output is the tables."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "flexlora", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "mem_available_gb": round(mem_available_bytes() / 2**30, 1),
    }


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where there is none): what can be allocated without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------------ short calls
class DualClock:
    """A Timer takes one clock; this one returns wall time and notes the thread's CPU time at the same instant,
    so one measured call yields both (timeit reads its clock exactly twice around the timed loop)."""

    def __init__(self) -> None:
        self.cpu: list[float] = [0.0, 0.0]

    def __call__(self) -> float:
        self.cpu = [self.cpu[-1], time.thread_time()]
        return time.perf_counter()

    def last_cpu(self) -> float:
        return self.cpu[1] - self.cpu[0]


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds per call
    cpu: float  # CPU seconds of the calling thread per call


class Bench:
    """One short call, measured with ``torch.utils.benchmark.Timer`` (garbage collector off while timing).

    A stateless call is measured as a block of ``calls`` calls after Timer's own two warm-up calls. A call
    that changes what it measures (an allocation event) passes ``restore``: it then runs one call per
    sample, with ``restore()`` as the Timer's untimed setup, so every timed call is the same event.
    """

    def __init__(self, fn: Callable[[], Any], restore: Callable[[], Any] | None = None) -> None:
        self.clock = DualClock()
        self.stateful = restore is not None
        self.timer = Timer(stmt="fn()", setup="restore()" if restore else "pass", timer=self.clock,
                           globals={"fn": fn, "restore": restore}, num_threads=torch.get_num_threads())

    def sample(self, calls: int) -> list[Sample]:
        if self.stateful:
            return [self._measure(1) for _ in range(calls)]
        return [self._measure(calls)]

    def _measure(self, number: int) -> Sample:
        measurement = self.timer.timeit(number)
        return Sample(wall=measurement.times[0], cpu=self.clock.last_cpu() / number)


def run_rounds(
    benches: dict[K, Bench], groups: Sequence[Sequence[K]], rounds: int, calls: int
) -> dict[K, list[list[Sample]]]:
    """``rounds`` rounds; in each, every group's benches in rotated order. Returns the samples per round."""
    samples: dict[K, list[list[Sample]]] = {key: [] for key in benches}
    for r in range(rounds):
        for group in groups:
            for key in rotation(group, r):
                samples[key].append(benches[key].sample(calls))
    return samples


def sample_stats(rounds: list[list[Sample]]) -> dict[str, float]:
    """Milliseconds per call: medians over all samples, wall and CPU."""
    flat = [s for samples in rounds for s in samples]
    return {"ms_median": 1e3 * median([s.wall for s in flat]), "cpu_ms_median": 1e3 * median([s.cpu for s in flat])}


def round_medians(rounds: list[list[Sample]]) -> list[float]:
    return [median([s.wall for s in samples]) for samples in rounds]


# ------------------------------------------------------------------------------------------------ gated fits
class Gate(L.Callback):
    """Parks a run at block boundaries (end of an optimizer step) until the main thread releases it.

    Appended last to the trainer's callbacks, so a step is timed end-of-step to end-of-step: data loading,
    forward, backward, the allocation callback, optimizer, scheduler and logging all fall inside it.
    """

    def __init__(self, warm: int, block: int, blocks: int, allocation: Any) -> None:
        self.warm, self.block, self.blocks, self.allocation = warm, block, blocks, allocation
        self.go, self.done = threading.Event(), threading.Event()
        self.wall: list[float] = []  # per timed block
        self.cpu: list[float] = []  # CPU time of the training thread
        self.faults: list[int] = []  # minor page faults of the training thread
        self.events: list[int] = []
        self.seq_lens: list[int] = []
        self._start: tuple[float, float, int] | None = None
        self._events_at_start = 0

    @staticmethod
    def _clock() -> tuple[float, float, int]:
        return time.perf_counter(), time.thread_time(), resource.getrusage(RUSAGE_THREAD).ru_minflt

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None and isinstance(batch, Mapping) and "input_ids" in batch:
            self.seq_lens.append(int(batch["input_ids"].shape[1]))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.warm or (step - self.warm) % self.block:
            return
        now = self._clock()
        if self._start is not None:
            self.wall.append(now[0] - self._start[0])
            self.cpu.append(now[1] - self._start[1])
            self.faults.append(now[2] - self._start[2])
            self.events.append(self.allocation.events - self._events_at_start)
        if len(self.wall) >= self.blocks:
            trainer.should_stop = True
            return
        self.done.set()
        self.go.wait()
        self.go.clear()
        self._events_at_start = self.allocation.events
        self._start = self._clock()


class GatedFit:
    """One run's real ``Trainer.fit``, in a thread that the main thread advances block by block."""

    def __init__(self, name: str, built: tuple[Any, Any, L.Trainer, Any], warm: int, block: int, blocks: int) -> None:
        self.name = name
        self.datamodule, self.module, self.trainer, self.allocation = built
        self.datamodule.setup("fit")
        # PreemptionCheckpoint installs a SIGUSR1 handler in setup, which only the main thread may do; outside
        # a signal its per-step work is one attribute check, so the timed runs go without it
        self.trainer.callbacks[:] = [c for c in self.trainer.callbacks if not isinstance(c, PreemptionCheckpoint)]
        self.gate = Gate(warm, block, blocks, self.allocation)
        self.trainer.callbacks.append(self.gate)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name=f"bench-{name}", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        torch.set_num_threads(1)
        self.gate.go.wait()
        self.gate.go.clear()
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule)
        except BaseException as err:  # reported by advance() in the main thread
            self.error = err
        finally:
            self.gate.done.set()

    def advance(self, timeout: float = 1800.0) -> None:
        self.gate.done.clear()
        self.gate.go.set()
        if not self.gate.done.wait(timeout):
            raise TimeoutError(f"{self.name}: a block did not finish within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"{self.name} training failed: {self.error!r}") from self.error


def interleave_fits(runs: dict[str, GatedFit], blocks: int) -> None:
    """Warm every run up (fit start, first steps, one event), then ``blocks`` rounds in rotating order."""
    names = list(runs)
    for name in names:
        runs[name].advance()
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: no full collection lands in a timed block
    try:
        for r in range(blocks):
            for name in rotation(names, r):
                runs[name].advance()
        for run in runs.values():
            run.thread.join(timeout=600)
    finally:
        gc.unfreeze()
