"""Checkpoints that survive clusters: atomic writes, choosing where to resume, preemption signals.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder, flushes it to disk
  and renames it, so a kill during the write leaves the previous file intact (Lightning's own save goes
  through a temporary file in the system temp folder, which is a copy, not a rename, on most clusters).
* :func:`resolve_checkpoint` turns ``ckpt_path`` (``auto``, ``last``, a path or null) into the file to resume
  from; a checkpoint that cannot be read is a one-line error naming it (``auto`` falls back to the previous
  complete one with a warning).
* :class:`PreemptionCheckpoint` saves a checkpoint at the next step boundary when the job is told to stop
  (SIGTERM, or SIGUSR1: SLURM's warning signal, what submitit forwards) and then stops the run with a
  non-zero status; rerunning the same command resumes. Under submitit the signal's previous handler (which
  requeues the job) runs after the checkpoint is written.
* :func:`trainer_plugins` turns Lightning's own SLURM auto-requeue off when the job runs under SLURM: submitit
  requeues (``conf/hydra/launcher/submitit_slurm.yaml``); two requeue mechanisms would requeue a job twice.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from flexlora.errors import FlexLoRAError
from flexlora.faults import fault_point
from flexlora.rundir import atomic_write

log = logging.getLogger(__name__)
CKPT_DIR = "checkpoints"


class AtomicCheckpointIO(TorchCheckpointIO):
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        def write(handle: Any) -> None:
            torch.save(checkpoint, handle)
            fault_point("checkpoint_write", handle)

        atomic_write(path, write, binary=True)


def _readable(path: Path) -> str | None:
    """None when the checkpoint loads; otherwise why not (one line)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated zip, bad pickle, I/O error: all mean "not usable"
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'unreadable'}"
    if not isinstance(state, dict) or "global_step" not in state or "state_dict" not in state:
        return "not a Lightning checkpoint (no global_step / state_dict)"
    return None


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder, newest first: last.ckpt, the periodic ones, Lightning's HPC saves."""
    found = list((run_dir / CKPT_DIR).glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    if not ckpt_path:
        return None
    if ckpt_path == "auto":
        for path in candidates(run_dir):
            why = _readable(path)
            if why is None:
                return path
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, why)
        return None
    path = run_dir / CKPT_DIR / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = ("resume in the same run folder (hydra.run.dir=<run dir>) or pass ckpt_path=<path to a .ckpt>"
                if ckpt_path == "last" else "pass an existing .ckpt file, ckpt_path=auto or ckpt_path=null")
        raise FlexLoRAError(f"ckpt_path={ckpt_path}: {path} does not exist; {hint}")
    why = _readable(path)
    if why is not None:
        raise FlexLoRAError(
            f"checkpoint {path} is unreadable ({why}): it is truncated or corrupt; delete it, or pass ckpt_path=auto "
            "to resume from the newest complete checkpoint of the run folder"
        )
    return path


class Preempted(SystemExit):
    """Raised at a step boundary after a stop signal and a saved checkpoint; exits with 128 + signal."""


class PreemptionCheckpoint(Callback):
    """Checkpoint at the next step boundary on SIGTERM / SIGUSR1, then stop (see the module docstring)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        main_thread = threading.current_thread() is threading.main_thread()
        if stage != "fit" or not hasattr(signal, "SIGUSR1") or not main_thread:
            return  # signal handlers live in the main thread only (as Lightning's own)
        # SIGTERM is Lightning's: it sets trainer.received_sigterm and stops after the step; we only add the save.
        self._previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, self._handler)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self.signal or (signal.SIGTERM if trainer.received_sigterm else None)
        if signum is None:
            return
        trainer.save_checkpoint(self.path)
        name = signal.Signals(signum).name
        log.warning("%s received: checkpoint %s saved at step %d; rerun the same command to resume", name,
                    self.path, trainer.global_step)
        if signum == signal.SIGTERM:
            return  # Lightning raises SIGTERMException right after this step
        previous = self._previous.get(signum)
        if callable(previous):  # submitit: checkpoint-and-requeue, then exit
            previous(signum, None)
        raise Preempted(128 + signum)


def is_stop_signal(err: BaseException) -> bool:
    return isinstance(err, (SIGTERMException, Preempted))


def trainer_plugins() -> list[Any]:
    """The Trainer's plugins: atomic checkpoint writes, and under SLURM an environment without auto-requeue
    (Lightning would otherwise also answer SIGUSR1 with ``scontrol requeue``, next to submitit's requeue)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins
