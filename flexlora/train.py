"""train(cfg): build the run from the Hydra config, fit, evaluate, and write the run folder's results.

Hydra builds every piece from its ``_target_`` (data, model, trainer, callbacks, loggers); this function
checks the config before anything heavy, decides whether to resume or skip (``ckpt_path``), and writes
``predictions.jsonl``, ``trained_state.safetensors`` and, last, ``metrics.json``, each atomically, so a
folder with a complete metrics.json is a finished run and nothing in it is ever half-written.
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
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from omegaconf import DictConfig, OmegaConf

from flexlora.allocators.config import allocator_config
from flexlora.conf_store import to_plain
from flexlora.config_checks import check_ranges
from flexlora.errors import FlexLoRAError
from flexlora.eventlog import json_safe
from flexlora.families import EvalRecords, Family, make_family
from flexlora.rundir import METRICS, PREDICTIONS, atomic_write_text, read_metrics, save_trained_state
from flexlora.training.checkpoints import (
    PreemptionCheckpoint,
    is_stop_signal,
    resolve_checkpoint,
    trainer_plugins,
)

log = logging.getLogger("flexlora")


def check_config(plain: dict[str, Any]) -> Family:
    """Everything that can be checked before a model is built: ranges, allocator fields, family and data paths.
    Returns the checked task family, which ``build`` hands to the DataModule and the module."""
    check_ranges(plain)
    allocator_config(plain["allocator"])
    family = make_family(plain["task"], plain["backbone"], plain["seed"])
    family.check()
    return family


def build(cfg: DictConfig, family: Family | None = None) -> tuple[L.LightningDataModule, Any, L.Trainer, Any]:
    """Data, module, trainer and the allocation callback, from the config (tests drive the pieces).

    The task family is built once (here, or by ``check_config``) and the DataModule and the module share it: a
    family that draws something at construction (the synthetic teacher) is drawn once."""
    from flexlora.training.callback import RankAllocationCallback
    from flexlora.training.reporter import RankReporter

    plain = to_plain(cfg)
    resolved = OmegaConf.create(plain)  # interpolations resolved, Enums as strings: what the library expects
    output_dir = Path(plain["paths"]["output_dir"])
    L.seed_everything(plain["seed"], workers=True)
    if family is None:
        family = make_family(plain["task"], plain["backbone"], plain["seed"])
    datamodule = instantiate(resolved.data, family=family)
    module = instantiate(resolved.model, family=family)
    allocation = RankAllocationCallback(seed=plain["seed"])
    callbacks: list[L.Callback] = [allocation, RankReporter(output_dir, allocation, **plain["report"])]
    show_progress = plain["trainer"]["enable_progress_bar"]
    loggers = [instantiate(entry) for entry in _targets(resolved.get("logger"))]
    for entry in _targets(resolved.get("callbacks")):
        callback = instantiate(entry)
        if isinstance(callback, ProgressBar) and not show_progress:
            continue
        callbacks.append(callback)
    if loggers and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
        callbacks.append(LearningRateMonitor(logging_interval="step"))  # the learning rate, whenever there is a logger
    callbacks.append(PreemptionCheckpoint(output_dir / "checkpoints"))
    trainer: L.Trainer = instantiate(
        resolved.trainer, callbacks=callbacks, logger=loggers or False, plugins=trainer_plugins()
    )
    for logger in trainer.loggers:  # the whole composed config, intact (the module logs no hyperparameters)
        logger.log_hyperparams(plain)
    return datamodule, module, trainer, allocation


def instantiate(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, but a user error raised while building keeps its one-line message (Hydra would
    wrap it in an InstantiationException with a traceback-style preamble)."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, FlexLoRAError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _targets(group: DictConfig | None) -> list[DictConfig]:
    """The entries of a config group that are objects to instantiate (skips plain settings)."""
    return [c for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def _best(history: list[dict[str, float]], lower_is_better: set[str]) -> dict[str, float]:
    best: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if key == "step" or value != value:  # NaN never wins
                continue
            better = min if key.endswith("loss") or key.endswith("mse") or key in lower_is_better else max
            best[key] = value if key not in best else better(best[key], value)
    return best


def train(cfg: DictConfig) -> float | None:
    """Fit (or resume, or skip a finished run), evaluate the final weights, write the results."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metric = cfg.optimized_metric
    mode = cfg.ckpt_path
    if mode == "auto" and (done := read_metrics(output_dir)) is not None:
        log.info("skip: %s is a finished run (complete %s); delete it to train again", output_dir, METRICS)
        return done["final"].get(metric) if metric else None
    family = check_config(to_plain(cfg))
    ckpt = resolve_checkpoint(mode, output_dir)
    datamodule, module, trainer, allocation = build(cfg, family)
    try:
        if ckpt is not None:
            log.info("resuming from %s", ckpt)
        if trainer.max_steps == 0:  # evaluation only: the untrained model (adapters at zero impact), e.g. a floor
            log.info("trainer.max_steps=0: evaluating without training")
        else:
            try:
                with warnings.catch_warnings():
                    # the DataModule checkpoints its position in the epoch and its sampler skips what was consumed,
                    # so a mid-epoch resume is exact; Lightning cannot see that and warns on every resume
                    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
                    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            except BaseException as err:
                if is_stop_signal(err):
                    log.warning("stopped by a signal at step %d; rerun the same command to resume",
                                trainer.global_step)
                    raise SystemExit(getattr(err, "code", None) or 143) from None
                raise
        trainer.validate(module, datamodule=datamodule, verbose=False)
        result = _results(cfg, module, trainer, allocation, started)
        if trainer.is_global_zero:
            _write_run(output_dir, module, result)
        final = result["final"]
        if metric and metric not in final:
            raise FlexLoRAError(f"optimized_metric {metric!r} is not among the metrics {sorted(final)}")
        return final.get(metric) if metric else None
    finally:
        _finish_wandb()


def _results(cfg: DictConfig, module: Any, trainer: L.Trainer, allocation: Any, started: float) -> dict[str, Any]:
    rank_pattern = module.rank_pattern()
    lower = {module.family.spec.main_metric} if module.family.spec.lower_is_better else set()
    return {
        "final": dict(module.last_metrics),
        "best": _best(module.eval_history, lower),
        "history": module.eval_history,
        "degenerate": {split: bool(module.degenerate.get(split)) for split in module.eval_splits},
        "degenerate_reason": dict(module.degenerate),
        "degenerate_check": module.family.degenerate_check,
        "predictions": PREDICTIONS,
        "rank_pattern": rank_pattern,
        "total_rank": sum(rank_pattern.values()),
        "trainable_params": module.trainable_parameters(),
        "events": allocation.events,
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - started, 1),
        "optimized_metric": cfg.optimized_metric,
        "config": to_plain(cfg),
    }


def _write_run(output_dir: Path, module: Any, result: dict[str, Any]) -> None:
    write_predictions(output_dir / PREDICTIONS, module.last_records)
    save_trained_state(module.trained_state_dict(), output_dir)
    # NaN stays NaN here (Python's json writes it as a bare NaN token): an undefined metric must read as one
    atomic_write_text(output_dir / METRICS, json.dumps({**result, "config": json_safe(result["config"])}, indent=2))
    log.info("metrics: %s", json.dumps(result["final"]))
    for split, why in module.degenerate.items():
        log.warning("DEGENERATE %s: %s", split, why)
    log.info("wrote %s", output_dir / METRICS)


def write_predictions(path: Path, records: dict[str, EvalRecords]) -> None:
    """One JSON object per example of the final evaluation: split, idx, label, prediction (+ score/output)."""
    lines = []
    for split, rec in records.items():
        for i, (idx, label, prediction) in enumerate(zip(rec.idx, rec.label, rec.prediction, strict=True)):
            row: dict[str, Any] = {"split": split, "idx": idx, "label": label, "prediction": prediction}
            if rec.score is not None:
                row["output" if isinstance(rec.score[i], str) else "score"] = rec.score[i]
            lines.append(json.dumps(json_safe(row)))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts its own."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()
