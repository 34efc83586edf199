"""Compose run configs for in-process training tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_run_config(output_dir: Path, glue_dir: Path, *overrides: str) -> DictConfig:
    """A tiny_deberta run on real RTE (first 256 rows), no logger, fast; ``overrides`` win."""
    base = [
        "backbone=tiny_deberta", "task=rte", f"task.data_dir={glue_dir / 'RTE'}", "task.max_train_samples=256",
        "task.max_eval_samples=64", "task.batch_size=8", "task.max_length=64", "logger=none",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks=none",
        "allocator.t_init=2", "allocator.t_final=2", "allocator.delta_t=1", "trainer.max_steps=20",
        f"hydra.run.dir={output_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=base + list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.pop("hydra")  # no HydraConfig singleton: Lightning's DDP launcher would treat the run as a Hydra app
        cfg.paths.output_dir = str(output_dir)
    return cfg
