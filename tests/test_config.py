"""Hydra compose-API tests: every option composes and instantiates what it names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from flexlora.allocators import allocator_config
from flexlora.conf_store import to_plain
from flexlora.tasks import TASKS

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
    return to_plain(cfg)


def test_default_is_the_offline_embedded_run():
    cfg = make([])
    assert (cfg.backbone.name, cfg.task.name, cfg.allocator.name) == ("minilm", "tweets", "flexlora")
    assert cfg.logger.offline is True
    assert cfg.optimized_metric == "val/accuracy"


FAMILY_BACKBONE = {"classification": "minilm", "causal_lm": "tiny_llama", "image": "tiny_vit",
                   "synthetic": "synthetic"}


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes_and_its_main_metric_comes_from_the_task_spec(task):
    spec = TASKS[task]
    cfg = resolve(make([f"task={task}", f"backbone={FAMILY_BACKBONE[spec.family]}"]))
    assert cfg["task"]["name"] == task
    assert cfg["optimized_metric"] == spec.main_metric
    assert cfg["optimized_metric"].split("/")[1] in spec.metrics
    tune = resolve(make([f"task={task}", "task.split=tune"]))
    assert tune["optimized_metric"].startswith("tune/")


@pytest.mark.parametrize("backbone", options("backbone"))
def test_every_backbone_composes(backbone):
    cfg = resolve(make([f"backbone={backbone}"]))
    assert cfg["backbone"]["name"] == backbone
    assert cfg["backbone"]["target_modules"]
    assert cfg["backbone"]["family"] in FAMILY_BACKBONE
    assert cfg["backbone"]["pretrained"] or cfg["backbone"]["from_config"]


@pytest.mark.parametrize("override, message", [
    ("allocator.importance=entropyy", "expected one of [entropy, nuclear, frobenius, sensitivity, random]"),
    ("allocator.rank=abc", "could not be converted to Integer"),
    ("allocator.no_such_field=1", "Key 'no_such_field' not in"),
    ("task.split=dev", "expected one of [test, tune]"),
    ("backbone.dtype=float8", "expected one of [float32, bfloat16, float16]"),
])
def test_bad_values_fail_when_the_config_is_composed(override, message):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        make([override])
    assert message in str(info.value.__cause__ or info.value)


def test_schema_help_is_on_every_field():
    import dataclasses

    from flexlora.allocators.config import METHODS
    from flexlora.schemas import TASK_SCHEMAS, BackboneConfig

    for cls in [m.config for m in METHODS.values()] + list(TASK_SCHEMAS.values()) + [BackboneConfig]:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("budget, ranks", [("default", (8, 12, 8)), ("flexlora_table", (12, 12, 12)),
                                           ("released_scripts", (2, 2, 2))])
def test_budgets_set_every_allocator_and_alpha_follows_r0(budget, ranks):
    for allocator, rank in zip(("lora", "adalora", "flexlora"), ranks, strict=True):
        cfg = resolve(make([f"budget={budget}", f"allocator={allocator}"]))
        assert cfg["allocator"]["rank"] == rank
        assert cfg["allocator"]["alpha"] / cfg["allocator"]["rank"] == cfg["budget"]["alpha_per_rank"]


@pytest.mark.parametrize("task, ratio", [("cola", 10.6667), ("sst2", 8.0), ("rte", 16.0)])
def test_deberta_glue_gives_every_method_the_released_alpha_over_r0(task, ratio):
    for allocator in ("lora", "adalora", "flexlora"):
        cfg = resolve(make(["+experiment=deberta_glue", f"task={task}", f"allocator={allocator}"]))
        assert cfg["allocator"]["alpha"] / cfg["allocator"]["rank"] == pytest.approx(ratio)
        assert cfg["trainer"]["gradient_clip_val"] == 1.0 and cfg["trainer"]["precision"] == "32-true"
        assert cfg["model"]["optimizer"]["eps"] == 1e-8


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


def test_command_line_allocator_wins_over_debug_and_experiments():
    cfg = make(["debug=tiny", "allocator=adalora"])
    assert cfg.allocator.name == "adalora" and "target_rank" in cfg.allocator
    assert cfg.backbone.name == "tiny_deberta" and cfg.trainer.max_steps == 30
    cfg = make(["debug=tiny", "backbone=minilm", "logger=wandb"])
    assert cfg.backbone.name == "minilm" and "wandb" in cfg.logger
    cfg = make(["+experiment=rank_recovery", "allocator=lora"])
    assert cfg.allocator.name == "lora" and cfg.backbone.name == "synthetic"


def test_model_and_data_are_built_by_hydra(tmp_path):
    from flexlora.train import build
    from tests.helpers import compose_config

    cfg = compose_config("debug=tiny", output_dir=tmp_path)
    datamodule, module, trainer, _ = build(cfg)
    assert type(module).__name__ == "AdaptedBackboneModule" and type(datamodule).__name__ == "TaskDataModule"
    assert trainer.max_steps == 30 and module.eval_splits == ["val"]


def test_schedule_overrides_apply_to_every_allocator():
    for allocator in options("allocator"):
        cfg = make([f"allocator={allocator}", "allocator.t_init=2", "allocator.t_final=2", "allocator.delta_t=1"])
        assert (cfg.allocator.t_init, cfg.allocator.t_final, cfg.allocator.delta_t) == (2, 2, 1)


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("allocator", ["lora", "adalora", "flexlora"])
def test_every_experiment_composes_to_valid_allocators(experiment, allocator):
    overrides = [f"+experiment={experiment}", f"allocator={allocator}"]
    if experiment == "llama_commonsense":
        overrides.append("task.data_dir=/data/commonsense")
    cfg = resolve(make(overrides))
    config = allocator_config(cfg["allocator"])
    assert config.name == allocator and cfg["optimized_metric"]
    if allocator == "adalora":  # every method ends at the same total budget
        flex = resolve(make([*overrides[:1], "allocator=flexlora", *overrides[2:]]))["allocator"]
        assert config.target_rank == flex["rank"]


def test_plain_hydra_compose_finds_the_schemas_without_register(tmp_path):
    """A notebook or another tool composes with Hydra's own API only: the hydra_plugins search-path plugin must
    register the schemas and resolvers (a fresh interpreter, so nothing was registered by this test session)."""
    script = (
        "from hydra import compose, initialize_config_dir\n"
        f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base=None):\n"
        "    c = compose('config', overrides=['+experiment=deberta_glue', 'allocator=flexlora', 'task=stsb'])\n"
        "print(c.allocator.budget_per_event, c.allocator.alpha, c.optimized_metric)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    budget, alpha, metric = done.stdout.split()
    assert int(budget) > 0 and float(alpha) > 0 and metric == "val/pearson"
