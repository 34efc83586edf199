"""Compose run configs for in-process training tests: debug=tiny plus what a test needs."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from flexlora.conf_store import register

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str, output_dir: Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (debug=tiny is not implied); ``output_dir`` replaces Hydra's."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=output_dir is not None)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.pop("hydra")  # no HydraConfig singleton: Lightning's DDP launcher would treat the run as a Hydra app
            cfg.paths.output_dir = str(output_dir)
    return cfg


def tiny_run_config(output_dir: Path, glue_dir: Path, *overrides: str) -> DictConfig:
    """debug=tiny on real RTE (first 256 rows), 20 steps, events every step; ``overrides`` win."""
    base = [
        "debug=tiny", "task=rte", f"task.data_dir={glue_dir / 'RTE'}", "task.max_length=64",
        "allocator.delta_t=1", "trainer.max_steps=20",
    ]
    return compose_config(*base, *overrides, output_dir=output_dir)
