"""train(cfg): instantiate data, model, callbacks and trainer from the Hydra config; fit; validate; report.

Writes ``metrics.json`` into the run folder (final and best metrics per split, rank pattern, total rank,
trainable parameters, number of allocation events, the resolved config) and returns the value of
``cfg.optimized_metric`` for Hydra sweepers.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from flexlora.data import TaskDataModule
from flexlora.errors import FlexLoRAError
from flexlora.export import save_trained_state
from flexlora.models import load_tokenizer
from flexlora.training import FlexLoRAModule, RankAllocationCallback
from flexlora.training.reporting import RankReporter

log = logging.getLogger(__name__)

# The DataModule checkpoints its position in the epoch and its sampler skips what was consumed, so a
# mid-epoch resume is exact; Lightning cannot see that and would warn on every resume.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _container(cfg: DictConfig | None) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None


def build(cfg: DictConfig) -> tuple[TaskDataModule, FlexLoRAModule, L.Trainer, RankAllocationCallback]:
    """Everything a run needs, from the config; separate from fit so tests can drive pieces."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    tokenizer = load_tokenizer(cfg.backbone)
    task = cfg.task
    datamodule = TaskDataModule(
        task.name, tokenizer, data_dir=task.get("data_dir"), hub_id=task.get("hub_id", "nyu-mll/glue"),
        max_length=task.max_length, batch_size=task.batch_size, eval_batch_size=task.eval_batch_size,
        num_workers=task.get("num_workers", 0), max_train_samples=task.get("max_train_samples"),
        max_eval_samples=task.get("max_eval_samples"), seed=cfg.seed,
    )
    module = FlexLoRAModule(
        backbone=_container(cfg.backbone), allocator=_container(cfg.allocator), task=task.name,
        optimizer=hydra.utils.instantiate(cfg.model.optimizer), warmup_steps=cfg.model.warmup_steps,
        eval_splits=datamodule.eval_split_names, seed=cfg.seed,
    )
    allocation = RankAllocationCallback(seed=cfg.seed)
    reporter = RankReporter(output_dir, **(_container(cfg.get("report")) or {}))
    allocation.listeners.append(reporter.on_event)
    callbacks: list[L.Callback] = [allocation, reporter]
    show_progress = cfg.trainer.get("enable_progress_bar", True)
    callbacks += [
        hydra.utils.instantiate(c) for c in _targets(cfg.get("callbacks"))
        if show_progress or not str(c["_target_"]).endswith("ProgressBar")
    ]
    loggers = [hydra.utils.instantiate(c) for c in _targets(cfg.get("logger"))]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer, allocation


def _targets(group: DictConfig | None) -> list[DictConfig]:
    """The entries of a config group that are objects to instantiate (skips plain settings)."""
    return [c for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def _best(history: list[dict[str, float]]) -> dict[str, float]:
    best: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if key == "step":
                continue
            better = min if key.endswith("loss") else max
            best[key] = value if key not in best else better(best[key], value)
    return best


def train(cfg: DictConfig) -> float | None:
    """Fit, validate the final weights, write metrics.json, return the optimised metric."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule, module, trainer, allocation = build(cfg)
    try:
        _log_config(trainer, cfg)
        ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"), output_dir)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        final = trainer.validate(module, datamodule=datamodule, verbose=False)
        final_metrics: dict[str, float] = {}
        for split_metrics in final:
            final_metrics.update({k: float(v) for k, v in split_metrics.items()})
        history = module.eval_history
        rank_pattern = module.rank_pattern()
        result = {
            "final": final_metrics,
            "best": _best(history),
            "history": history,
            "rank_pattern": rank_pattern,
            "total_rank": sum(rank_pattern.values()),
            "trainable_params": module.trainable_parameters(),
            "events": allocation.events,
            "steps": trainer.global_step,
            "wall_time_s": round(time.time() - started, 1),
            "optimized_metric": cfg.get("optimized_metric"),
            "config": _container(cfg),
        }
        if trainer.is_global_zero:
            save_trained_state(module, output_dir)
            (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
            log.info("metrics: %s", json.dumps(final_metrics))
            log.info("wrote %s", output_dir / "metrics.json")
        metric = cfg.get("optimized_metric")
        if metric and metric not in final_metrics:
            raise FlexLoRAError(f"optimized_metric {metric!r} is not among the metrics {sorted(final_metrics)}")
        return final_metrics.get(metric) if metric else None
    finally:
        _finish_wandb()


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` means this run folder's checkpoints/last.ckpt; anything else is a path."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FlexLoRAError(
                f"ckpt_path=last but {path} does not exist; resume in the same run folder (hydra.run.dir=<run dir>) "
                "or pass ckpt_path=<path to a .ckpt>"
            )
        return str(path)
    if not Path(ckpt_path).is_file():
        raise FlexLoRAError(f"ckpt_path={ckpt_path!r} is not a file")
    return ckpt_path


def _log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    for logger in trainer.loggers:
        logger.log_hyperparams(_container(cfg))


def _finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts its own."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()
