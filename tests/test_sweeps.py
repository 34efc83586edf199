"""Sweep tooling through the real entry point: Optuna search, submitit launchers, a W&B multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

pytestmark = pytest.mark.slow  # end-to-end tier: python -m pytest (README)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def tiny(glue_dir: Path, steps: int = 8) -> list[str]:
    """A tiny_deberta multirun on the first 256 RTE rows (events at steps 3 .. steps - 3)."""
    return ["backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}", "task.max_train_samples=256",
            "task.max_eval_samples=64", "task.batch_size=8", "task.max_length=64", "callbacks=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "allocator.t_init=2",
            "allocator.t_final=2", "allocator.delta_t=1", f"trainer.max_steps={steps}"]


def multirun(sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", "-m", f"hydra.sweep.dir={sweep}", *overrides], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def runs(sweep: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))}


def test_optuna_search_runs_two_trials(tmp_path, glue_dir):
    sweep = tmp_path / "optuna"
    multirun(sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none", "allocator=flexlora",
             *tiny(glue_dir, steps=6))
    trials = runs(sweep)
    assert len(trials) == 2
    lrs = [m["config"]["model"]["optimizer"]["lr"] for m in trials.values()]
    gammas = [m["config"]["allocator"]["orth_reg"] for m in trials.values()]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and all(0.0 <= g <= 0.5 for g in gammas)
    assert len(set(lrs)) == 2, "each trial samples its own learning rate"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"model.optimizer.lr", "allocator.orth_reg"}
    # the sweeper maximised what train() returned: optimized_metric = the task's main metric
    assert results["best_value"] == pytest.approx(max(m["final"]["val/accuracy"] for m in trials.values()))
    best = next(m for m in trials.values() if m["config"]["model"]["optimizer"]["lr"] == results["best_params"][
        "model.optimizer.lr"])
    assert best["final"]["val/accuracy"] == pytest.approx(results["best_value"])


# a conf/ file named like the plugin's schema is validated against it (Hydra 1.3 warns that this is deprecated)
@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")
@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local"])
def test_submitit_launchers_compose_for_ddp(launcher, tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "trainer=ddp", "trainer.devices=4",
                                           f"hydra.sweep.dir={tmp_path}", "hydra.job.name=run"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.tasks_per_node == 4  # one process per device: DDP under Slurm / submitit
    launcher_obj = instantiate(cfg.hydra.launcher)
    assert type(launcher_obj).__name__ == {"submitit_slurm": "SlurmLauncher", "submitit_local": "LocalLauncher"}[
        launcher]
    if launcher != "submitit_slurm":
        return
    # submitit itself validates every field (as the launcher passes them) and writes the sbatch script
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    params = dict(launcher_obj.params)
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tempfile.mkdtemp(dir=tmp_path), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python run.py", "uid")
    assert "#SBATCH --ntasks-per-node=4" in sbatch and "#SBATCH --gpus-per-node=4" in sbatch
    assert "#SBATCH --time=720" in sbatch


def test_submitit_local_runs_a_tiny_job(tmp_path, glue_dir):
    sweep = tmp_path / "local"
    multirun(sweep, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "logger=none", "allocator=lora",
             *tiny(glue_dir, steps=3))
    (metrics,) = runs(sweep).values()
    assert metrics["steps"] == 3 and metrics["config"]["allocator"]["name"] == "lora"
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "the job ran through submitit"


def test_wandb_multirun_gives_each_job_its_own_run_and_reports(tmp_path, glue_dir):
    sweep = tmp_path / "wandb"
    multirun(sweep, "allocator=lora,flexlora", "logger=wandb", *tiny(glue_dir, steps=8))
    found = runs(sweep)
    assert {m["config"]["allocator"]["name"] for m in found.values()} == {"lora", "flexlora"}
    wandb_runs = set()
    for run_dir, metrics in found.items():
        (offline,) = (run_dir / "wandb").glob("offline-run-*")  # exactly one W&B run per job, in its own folder
        assert list(offline.glob("run-*.wandb"))
        wandb_runs.add(offline.name.rsplit("-", 1)[-1])
        assert (run_dir / "rank_heatmap.png").is_file() and (run_dir / "rank_dynamics.png").is_file()
        lines = [json.loads(x) for x in (run_dir / "ranks.jsonl").read_text().splitlines()]
        assert sum(r["kind"] == "event" for r in lines) == metrics["events"]
        assert [r["kind"] for r in (lines[0], lines[-1])] == ["start", "end"]
    assert len(wandb_runs) == 2, "the two jobs must not share a W&B run"
    assert {m["config"]["allocator"]["name"]: m["events"] for m in found.values()} == {"lora": 0, "flexlora": 3}
