"""Rank reports for people with and without W&B: ``ranks.jsonl``, PNG figures, W&B tables and images.

The records themselves belong to :class:`~flexlora.training.callback.RankAllocationCallback` (one event log);
this callback gives that log its file on rank 0, turns events into W&B tables and figures, and writes the
final ``rank_pattern.json`` and figures when training ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from flexlora.plots import dynamics_figure, heatmap_figure, importance_figure
from flexlora.rundir import EVENTS, RANK_PATTERN, atomic_write_text
from flexlora.training.callback import RankAllocationCallback
from flexlora.training.module import AdaptedBackboneModule

TABLE_COLUMNS = ["step", "matrix", "layer", "module_type", "live_rank", "importance", "pruned", "grown",
                 "skipped_full"]


def event_rows(record: Mapping[str, Any]) -> list[list[Any]]:
    """One row per matrix of an event record, for a W&B table (a dashboard plots rank per matrix over steps)."""
    rows = []
    for name, rank in record["ranks"].items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        layer, kind = (int(match.group(1)), match.group(2)) if match else (-1, name)
        rows.append([record["step"], name, layer, kind, rank, record.get("importance", {}).get(name),
                     record.get("pruned", {}).get(name, 0), record.get("grown", {}).get(name, 0),
                     record.get("skipped_full", 0)])
    return rows


class RankReporter(Callback):
    """Writes the event log file and figures into the run folder; sends tables and images to W&B."""

    def __init__(self, output_dir: str | Path, allocation: RankAllocationCallback, heatmap_every_n_events: int = 1,
                 table_every_n_events: int = 1, figures: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.allocation = allocation
        self.heatmap_every = max(1, int(heatmap_every_n_events))
        self.table_every = max(1, int(table_every_n_events))
        self.figures = figures
        self._trainer: L.Trainer | None = None
        self._events_seen = 0
        allocation.listeners.append(self.on_event)

    @property
    def path(self) -> Path:
        return self.output_dir / EVENTS

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit" and trainer.is_global_zero:
            self.allocation.event_log.path = self.path

    def _wandb(self) -> list[WandbLogger]:
        return [lg for lg in (self._trainer.loggers if self._trainer else []) if isinstance(lg, WandbLogger)]

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Called by RankAllocationCallback on rank 0 after each applied plan."""
        self._events_seen += 1
        loggers = self._wandb()
        if not loggers:
            return
        importance = {f"importance/{k}": v for k, v in record.get("importance", {}).items() if v is not None}
        for lg in loggers:
            if importance:
                lg.log_metrics(importance, step=record["step"])
            if self._events_seen % self.table_every == 0:
                lg.log_table("alloc/event_table", columns=TABLE_COLUMNS, data=event_rows(record), step=record["step"])
            if self.figures and self._events_seen % self.heatmap_every == 0:
                self._log_figure(lg, "alloc/rank_heatmap", heatmap_figure(record["ranks"],
                                                                          f"live rank at step {record['step']}"),
                                 record["step"])

    @staticmethod
    def _log_figure(lg: WandbLogger, key: str, fig: Any, step: int | None = None) -> None:
        import matplotlib.pyplot as plt

        lg.log_image(key, images=[fig], step=step)
        plt.close(fig)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, AdaptedBackboneModule):
            return
        ranks = pl_module.rank_pattern()
        atomic_write_text(self.output_dir / RANK_PATTERN, json.dumps(ranks, indent=2))
        records = self.allocation.event_log.records
        name = pl_module.allocator_config.name
        figures = {}
        if self.figures:
            import matplotlib.pyplot as plt

            figures = {"rank_heatmap": heatmap_figure(ranks, f"final live rank ({name})"),
                       "rank_dynamics": dynamics_figure(records, f"live rank over training ({name})")}
            for stem, fig in figures.items():
                fig.savefig(self.output_dir / f"{stem}.png", dpi=110)
                plt.close(fig)
        for lg in self._wandb():
            import wandb

            for stem in figures:
                lg.log_image(f"alloc/final_{stem}", images=[str(self.output_dir / f"{stem}.png")])
            importance = importance_figure(self.allocation.event_log.events(), f"importance per matrix ({name})")
            if importance is not None:
                self._log_figure(lg, "alloc/importance", importance)
            artifact = wandb.Artifact(f"rank_pattern-{lg.experiment.id}", type="rank_pattern")
            artifact.add_file(str(self.output_dir / RANK_PATTERN))
            lg.experiment.log_artifact(artifact)
