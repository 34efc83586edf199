"""Sweeps that survive clusters: kills at random moments, SIGTERM, reruns of finished runs, torn checkpoints.

Every case reruns *the same command* in the same run folder and must end exactly where an uninterrupted run
ends: same rank pattern, final metrics within 1e-4, the same ranks.jsonl, and every JSON file parseable.
``FLEXLORA_FAULT=<point>:<n>`` (flexlora/faults.py) kills the process with SIGKILL at the n-th passage of a
point; the n are drawn at random (seeded) per point. ``python -m tests.fault_campaign --kills 24`` runs a
longer campaign with the same checks.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest

from tests.fault_campaign import ENV, REPO, assert_same, command, launch, outcome

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, glue_dir) -> dict:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = launch(run_dir, glue_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = outcome(run_dir)
    assert result["events"] == 19 and [h["step"] for h in result["history"]] == [10, 20, 24]  # + final
    return result


_rng = random.Random(2026)
# (point, passage): event passages 1..19 are the allocation events; checkpoint writes are stepN + last per
# period (12 in the run); validation passages are evaluation batches (2 per evaluation, 3 evaluations).
KILLS = [*(("step", n) for n in _rng.sample(range(2, 24), 2)), *(("event", n) for n in _rng.sample(range(1, 20), 2)),
         *(("checkpoint_write", n) for n in _rng.sample(range(1, 13), 2)), ("validation", _rng.randint(1, 4)),
         ("validation", 5)]


@pytest.mark.parametrize("point, passage", KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_sigkill_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path, glue_dir, reference, point,
                                                                          passage):
    run_dir = tmp_path / "run"
    killed = launch(run_dir, glue_dir, fault=f"{point}:{passage}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "metrics.json").exists()
    rerun = launch(run_dir, glue_dir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_same(outcome(run_dir), reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_stops_and_the_rerun_resumes(tmp_path, glue_dir, reference, signum):
    """SIGTERM (Slurm's stop, Lightning's handling) and SIGUSR1 (Slurm's warning signal, what submitit forwards)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, glue_dir), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output[-2000:]
    assert f"{signal.Signals(signum).name} received: checkpoint" in output and "Traceback" not in output
    assert not (run_dir / "metrics.json").exists()
    rerun = launch(run_dir, glue_dir)
    assert rerun.returncode == 0 and "resuming from" in rerun.stdout + rerun.stderr
    assert_same(outcome(run_dir), reference)
    if signum != signal.SIGTERM:
        return
    # a finished run is skipped, not retrained, and its results are left untouched
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    again = launch(run_dir, glue_dir)
    assert again.returncode == 0 and "skip:" in again.stdout + again.stderr
    assert (run_dir / "metrics.json").stat().st_mtime_ns == before


def test_torn_checkpoint_is_one_clear_error_or_an_auto_fallback(tmp_path, glue_dir, reference):
    run_dir = tmp_path / "run"
    killed = launch(run_dir, glue_dir, fault="validation:5")  # killed in the final evaluation: training is done
    assert killed.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    strict = subprocess.run(command(run_dir, glue_dir, "ckpt_path=last"), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    output = strict.stdout + strict.stderr
    assert strict.returncode == 2 and "Traceback" not in output
    assert f"checkpoint {last} is unreadable" in output and "ckpt_path=auto" in output
    fallback = launch(run_dir, glue_dir)  # ckpt_path=auto: warns, resumes from the previous complete checkpoint
    assert fallback.returncode == 0 and "unreadable" in fallback.stdout + fallback.stderr
    assert_same(outcome(run_dir), reference)


def test_sigusr1_chains_to_the_launchers_handler_after_the_checkpoint(tmp_path):
    """Under submitit, SIGUSR1's previous handler requeues the job: it must run, and only after the save."""
    from types import SimpleNamespace

    from flexlora.training.checkpoints import Preempted, PreemptionCheckpoint

    calls: list[str] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append("requeue"))
    try:
        trainer = SimpleNamespace(global_step=7, received_sigterm=False,
                                  save_checkpoint=lambda path: calls.append(f"save {path.name}"))
        callback = PreemptionCheckpoint(tmp_path)
        callback.setup(trainer, None, "fit")
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert calls == []  # no signal: nothing happens
        signal.raise_signal(signal.SIGUSR1)
        with pytest.raises(Preempted) as info:
            callback.on_train_batch_end(trainer, None, None, None, 0)
        assert calls == ["save last.ckpt", "requeue"] and info.value.code == 128 + signal.SIGUSR1
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) is not callback._handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_under_slurm_lightnings_own_requeue_is_off(monkeypatch):
    """submitit requeues; Lightning's SLURM auto-requeue would answer the same SIGUSR1 with a second requeue."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from flexlora.training.checkpoints import AtomicCheckpointIO, trainer_plugins

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert [type(p) for p in trainer_plugins()] == [AtomicCheckpointIO]  # not under SLURM: Lightning's default
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "flexlora", "SLURM_NODELIST": "node1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(name, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=trainer_plugins(), max_steps=1)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
