"""Range checks on the composed config: a bad value stops the run with one line naming the fix, before any data
or model is loaded (Hydra's schemas check types; these check what the types allow but training cannot use)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexlora.errors import FlexLoRAError


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise FlexLoRAError(f"{key}={value!r}: {rule}; set e.g. {key}={example}")


def check_ranges(plain: Mapping[str, Any]) -> None:
    seed = plain.get("seed")
    _require(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "must be an integer", "1")
    model = plain.get("model") or {}
    optimizer = model.get("optimizer") or {}
    if "lr" in optimizer:
        lr = optimizer["lr"]
        _require(_number(lr) and lr > 0, "model.optimizer.lr", lr, "must be a number > 0", "1e-3")
    if "weight_decay" in optimizer:
        wd = optimizer["weight_decay"]
        _require(_number(wd) and wd >= 0, "model.optimizer.weight_decay", wd, "must be >= 0", "0.01")
    head_lr = model.get("head_lr")
    _require(head_lr is None or (_number(head_lr) and head_lr > 0), "model.head_lr", head_lr,
             "must be null (the adapters' lr) or a number > 0", "1e-3")
    warmup = model.get("warmup_steps", 0)
    _require(_number(warmup) and warmup >= 0, "model.warmup_steps", warmup,
             "must be >= 0 (steps, or a fraction of T below 1)", "0.06")
    task = plain.get("task") or {}
    for key in ("batch_size", "eval_batch_size"):
        if key in task:
            _require(isinstance(task[key], int) and task[key] >= 1, f"task.{key}", task[key], "must be >= 1", "16")
    if task.get("max_length") is not None:
        _require(isinstance(task["max_length"], int) and task["max_length"] >= 3, "task.max_length",
                 task["max_length"], "must be >= 3 (special tokens plus at least one token of text)", "128")
    for key in ("max_train_samples", "max_eval_samples"):
        value = task.get(key)
        _require(value is None or (isinstance(value, int) and value >= 1), f"task.{key}", value,
                 "must be null (all) or >= 1", "256")
