"""Hydra compose-API tests: every option composes and instantiates what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from flexlora.allocators import allocator_config
from flexlora.data import TASKS

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def make(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def resolve(cfg) -> dict:
    cfg.hydra.runtime.output_dir = "/tmp/x"
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_is_the_offline_embedded_run():
    cfg = make([])
    assert (cfg.backbone.name, cfg.task.name, cfg.allocator.name) == ("minilm", "tweets", "flexlora")
    assert cfg.logger.offline is True
    assert cfg.optimized_metric == "val/accuracy"


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes(task):
    cfg = resolve(make([f"task={task}"]))
    assert cfg["task"]["name"] == task and task in TASKS
    split, metric = cfg["optimized_metric"].split("/")
    assert metric in TASKS[task].metrics
    assert split in [s.name for s in TASKS[task].eval_splits] or task == "tweets"


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_composes(backbone):
    cfg = resolve(make([f"backbone={backbone}"]))
    assert cfg["backbone"]["name"] == backbone
    assert cfg["backbone"]["target_modules"] and cfg["backbone"]["head_modules"]
    assert cfg["backbone"]["pretrained"] or cfg["backbone"]["from_config"]


@pytest.mark.parametrize("allocator", options("allocator"))
def test_every_allocator_composes_to_a_valid_config(allocator):
    cfg = resolve(make([f"allocator={allocator}"]))
    assert allocator_config(cfg["allocator"]).name == allocator


@pytest.mark.parametrize("group", ["trainer", "logger", "callbacks"])
def test_other_groups_compose(group):
    for option in options(group):
        resolve(make([f"{group}={option}"]))


def test_experiment_deberta_glue_with_flexlora():
    cfg = make(["+experiment=deberta_glue", "allocator=flexlora"])
    assert cfg.allocator.name == "flexlora" and "budget_per_event" in cfg.allocator
    assert cfg.backbone.name == "deberta_v3_base"
    resolved = resolve(cfg)
    assert resolved["task"]["name"] == "rte"
    assert resolved["model"]["optimizer"]["lr"] == 1.2e-3
    assert resolved["allocator"]["t_init"] == 600 and resolved["allocator"]["delta_t"] == 1
    assert resolved["backbone"]["config"]["cls_dropout"] == 0.2


@pytest.mark.parametrize("task, lr, t_final", [("cola", 8e-4, 3500), ("mnli", 5e-4, 50000), ("stsb", 2.2e-3, 2000)])
def test_deberta_glue_per_task_hyperparameters(task, lr, t_final):
    resolved = resolve(make(["+experiment=deberta_glue", f"task={task}"]))
    assert resolved["model"]["optimizer"]["lr"] == lr
    assert resolved["allocator"]["t_final"] == t_final
    assert resolved["task"]["batch_size"] == 32


def test_command_line_allocator_wins_over_the_experiment():
    # quickstart names flexlora; the command line picks adalora
    cfg = make(["+experiment=quickstart", "allocator=adalora"])
    assert cfg.allocator.name == "adalora" and "target_rank" in cfg.allocator
    cfg = make(["allocator=adalora", "+experiment=quickstart"])
    assert cfg.allocator.name == "adalora"


def test_schedule_overrides_apply_to_every_allocator():
    for allocator in options("allocator"):
        cfg = make([f"allocator={allocator}", "allocator.t_init=2", "allocator.t_final=2", "allocator.delta_t=1"])
        assert (cfg.allocator.t_init, cfg.allocator.t_final, cfg.allocator.delta_t) == (2, 2, 1)
