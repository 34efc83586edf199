"""Compose run configs for in-process training tests: debug=tiny plus what a test needs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from flexlora.conf_store import compose as compose_config

__all__ = ["compose_config", "tiny_run_config"]


def tiny_run_config(output_dir: Path, glue_dir: Path, *overrides: str) -> DictConfig:
    """debug=tiny on real RTE (first 256 rows), 20 steps, events every step; ``overrides`` win."""
    base = [
        "debug=tiny", "task=rte", f"task.data_dir={glue_dir / 'RTE'}", "task.max_length=64",
        "allocator.delta_t=1", "trainer.max_steps=20",
    ]
    return compose_config(*base, *overrides, output_dir=output_dir)
