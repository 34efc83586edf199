"""The AdaLoRA paper's GLUE table (plus tweets and any unknown classification task), and the family dispatch.

Columns, headers and metric keys come from :data:`flexlora.tasks.TASKS`, so a task added there appears here in
the paper's order without touching this module.
"""

from __future__ import annotations

from collections.abc import Sequence

from flexlora.aggregate.collect import DEFAULT_ROWS, Run, dedupe, warn
from flexlora.aggregate.core import Column, Table, build_table, method_label
from flexlora.aggregate.families import TUNE
from flexlora.tasks import TASKS

GLUE_CAPTION = ("Mean ± sample std (ddof=1) over seeds, x100; n = seeds. Avg: one number per task "
                "(MNLI m/mm and QQP Acc/F1 averaged first), averaged over tasks.")


def tune_keys(keys: Sequence[str], split: str) -> tuple[str, ...]:
    """A task's metric keys as a run of that split logs them: ``tune/...`` under task.split=tune (deduplicated)."""
    if split != "tune":
        return tuple(keys)
    return tuple(dict.fromkeys("tune/" + k.split("/", 1)[-1] for k in keys))


def glue_columns(runs: Sequence[Run], split: str = "test") -> list[Column]:
    """Known classification tasks in TASKS order, then unknown tasks with the metric their runs optimised."""
    present = {r.task for r in runs}
    columns = [Column(name, spec.header, spec.label, tune_keys(spec.keys, split))
               for name, spec in TASKS.items() if spec.family == "classification" and name in present]
    for task in sorted(present - set(TASKS)):
        metric = next(r.main_metric for r in runs if r.task == task) or "val/accuracy"
        columns.append(Column(task, task, metric.rsplit("/", 1)[-1], tune_keys((metric,), split)))
    return columns


def glue_tables(runs: Sequence[Run], row_keys: Sequence[str] = DEFAULT_ROWS) -> list[Table]:
    """One table per backbone (and per split kind), one row per method, one column per task."""
    tables = []
    for backbone, split in sorted({(r.backbone, r.split == "tune") for r in runs}):
        notes: list[str] = []
        mine = dedupe([r for r in runs if r.backbone == backbone and (r.split == "tune") == split], notes,
                      lambda r: method_label(r.row, row_keys))
        tables.append(build_table(
            backbone, mine, glue_columns(mine, "tune" if split else "test"), row_keys, lambda r: {r.task}, notes,
            title=backbone + (TUNE if split else ""), caption=GLUE_CAPTION, kind="glue/tune" if split else "glue",
        ))
        if not all(r.complete for r in tables[-1].rows):
            notes.append("* Avg over the tasks this row has (incomplete row).")
    return tables


def summarise(runs: Sequence[Run], row_keys: Sequence[str] = DEFAULT_ROWS) -> list[Table]:
    """Every registered family's tables (flexlora.family_registry), in registration order; runs of a family
    without a registered table rule are reported, never silently dropped."""
    from flexlora.family_registry import FAMILIES

    by_family: dict[str, list[Run]] = {}
    for run in runs:
        by_family.setdefault(run.family, []).append(run)
    tables: list[Table] = []
    for name, entry in FAMILIES.items():
        tables += entry.resolve(entry.tables)(by_family.get(name, []), row_keys)
    for name in sorted(set(by_family) - set(FAMILIES)):
        warn(f"{len(by_family[name])} run(s) of task family {name!r} have no table rule (flexlora.family_registry)")
    return tables
