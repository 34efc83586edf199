"""Peak resident memory of each method's short training run vs lora, each run in a forked process.

A fork starts from the benchmark process right after its imports (this part runs first), so a child holds
nothing of the other runs. The child builds the run from the step-time config, resets the kernel's
peak-RSS counter right before ``trainer.fit`` and reads ``VmHWM`` after it.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.config import run_config
from benchmarks.harness import median, quiet, rotation
from benchmarks.modes import LORA, MEMORY_RUNS, Mode, RunSpec
from flexlora.train import build


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes of the tensors in ``values``, looking into (nested) dicts, lists and tuples."""
    total = 0
    for value in values:
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += _tensor_bytes(value.values())
        elif isinstance(value, list | tuple):
            total += _tensor_bytes(value)
    return total


class _StopAt(L.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def memory_run(mode: Mode, spec: RunSpec, out_dir: Path) -> dict[str, Any]:
    """One method's short training run; meant to run in a process of its own."""
    quiet()
    datamodule, module, trainer, allocation = build(run_config(mode.step, spec, out_dir))
    datamodule.setup("fit")
    trainer.callbacks.append(_StopAt(mode.memory_steps))
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    trainer.fit(module, datamodule=datamodule)
    peak = _status_kb("VmHWM")
    trainable = [p for p in module.parameters() if p.requires_grad]
    tracker = getattr(allocation.allocator, "tracker", None)
    state = {
        "trainable_params": _tensor_bytes(trainable),
        "gradients": _tensor_bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_state": _tensor_bytes(trainer.optimizers[0].state.values()),
        "allocator_state": 0 if tracker is None else _tensor_bytes(tracker.state_dict().values()),
    }
    return {
        "steps": trainer.global_step, "events": allocation.events, "peak_reset_before_fit": reset,
        "max_rank": module.allocator_config.max_rank, "rss_before_fit_kb": rss_before, "peak_rss_fit_kb": peak,
        "fit_increment_kb": peak - rss_before, "training_state_bytes": sum(state.values()),
        "training_state_breakdown": state,
    }


def in_fork(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child (this process's imports, nothing else of its state); its JSON result."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        code = 0
        try:
            payload = json.dumps(fn(*args))
        except BaseException:
            payload, code = json.dumps({"error": traceback.format_exc()}), 1
        with os.fdopen(write_fd, "w") as handle:
            handle.write(payload)
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    result = json.loads(data) if data else {"error": "the child process died without a result"}
    if "error" in result:
        raise RuntimeError(f"memory run failed in its child process:\n{result['error']}")
    return result


def bench_memory(mode: Mode, work: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in MEMORY_RUNS}
    for r in range(mode.memory_repeats):
        for spec in rotation(MEMORY_RUNS, r):
            runs[spec.name].append(in_fork(memory_run, mode, spec, work / f"mem-{spec.name}-{r}"))
    out: dict[str, Any] = {"setup": {
        "what": "VmHWM (peak resident set size) of a forked process while it runs trainer.fit, reset right "
                "before fit; the process has already imported the stack, built the model and tokenised the data",
        "backbone": mode.step.backbone, "steps_per_run": runs[LORA][0]["steps"], "repeats": mode.memory_repeats,
        "max_rank": {name: rs[0]["max_rank"] for name, rs in runs.items()},
        "peak_reset_supported": all(r["peak_reset_before_fit"] for rs in runs.values() for r in rs),
    }}
    for name, rs in runs.items():
        out[name] = {
            "peak_rss_fit_mb": median([r["peak_rss_fit_kb"] for r in rs]) / 1024,
            "rss_before_fit_mb": median([r["rss_before_fit_kb"] for r in rs]) / 1024,
            "fit_increment_mb": median([r["fit_increment_kb"] for r in rs]) / 1024,
            "training_state_mb": rs[0]["training_state_bytes"] / 2**20,
            "training_state_breakdown_mb": {k: v / 2**20 for k, v in rs[0]["training_state_breakdown"].items()},
            "events": rs[0]["events"],
        }
    for name in runs:
        if name == LORA:
            continue
        for key in ("peak_rss_fit_mb", "fit_increment_mb", "training_state_mb"):
            base = out[LORA][key]
            out[name][key.replace("_mb", "_vs_lora")] = out[name][key] / base if base > 0 else float("nan")
    return out
