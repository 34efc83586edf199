"""Rank reports for people with and without W&B: ``ranks.jsonl``, PNG figures, W&B images per event."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from flexlora.training.module import FlexLoRAModule


def layer_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """Arrange per-matrix values as layers x module types (rows: layer index, columns: module type).

    A module name like ``deberta.encoder.layer.3.attention.self.query_proj`` has layer ``3`` and type
    ``attention.self.query_proj``; names without a layer index go to a row named after their prefix.
    """
    layers: list[str] = []
    types: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    for name, value in ranks.items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        layer, kind = (match.group(1), match.group(2)) if match else (name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1])
        if layer not in layers:
            layers.append(layer)
        if kind not in types:
            types.append(kind)
        cells[(layer, kind)] = float(value)
    grid = [[cells.get((layer, kind), float("nan")) for kind in types] for layer in layers]
    return layers, types, grid


def heatmap_figure(ranks: Mapping[str, int], title: str):  # -> matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, types, grid = layer_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(types), 0.9 + 0.35 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(types)), [t.replace("attention.", "attn.") for t in types], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [f"layer {x}" for x in layers])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:g}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="live rank")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dynamics_figure(records: Sequence[Mapping[str, Any]]):  # -> matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    names = list(records[0]["ranks"]) if records else []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [1, 2]})
    top.plot(steps, [r["total_rank"] for r in records], marker=".", label="total live rank")
    budgets = [(r["step"], r["budget"]) for r in records if r.get("budget") is not None]
    if budgets:
        top.plot(*zip(*budgets, strict=True), linestyle="--", label="budget")
    top.set_xlabel("optimizer step")
    top.set_ylabel("rank")
    top.legend()
    matrix = [[r["ranks"][n] for r in records] for n in names]
    image = bottom.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    bottom.set_ylabel(f"matrix (0..{len(names) - 1})")
    bottom.set_xlabel("record (step 0, events, end)")
    fig.colorbar(image, ax=bottom, label="live rank")
    fig.tight_layout()
    return fig


class RankReporter(Callback):
    """Writes the event log and figures into the run folder; sends images to W&B when it is a logger."""

    def __init__(self, output_dir: str | Path, heatmap_every_n_events: int = 1, figures: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.heatmap_every = max(1, int(heatmap_every_n_events))
        self.figures = figures
        self.records: list[dict[str, Any]] = []
        self._trainer: L.Trainer | None = None
        self._events_seen = 0

    @property
    def path(self) -> Path:
        return self.output_dir / "ranks.jsonl"

    def _write(self, record: Mapping[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.records.append(dict(record))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        if not trainer.is_global_zero or not isinstance(pl_module, FlexLoRAModule):
            return
        if self.path.exists() and trainer.ckpt_path:
            # Resumed: keep the log up to the checkpoint's step; what the killed run wrote later is redone.
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["kind"] != "end" and r["step"] <= trainer.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            return
        self.path.unlink(missing_ok=True)
        ranks = pl_module.rank_pattern()
        self._write({"step": 0, "event": 0, "kind": "start", "total_rank": sum(ranks.values()), "budget": None,
                     "ranks": ranks, "importance": {}})

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Called by RankAllocationCallback on rank 0 after each applied plan."""
        self._write({"kind": "event", **record})
        self._events_seen += 1
        trainer = self._trainer
        if trainer is None:
            return
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not wandb_loggers:
            return
        payload: dict[str, Any] = {f"importance/{k}": v for k, v in record.get("importance", {}).items()}
        if self.figures and self._events_seen % self.heatmap_every == 0:
            import matplotlib.pyplot as plt
            import wandb

            fig = heatmap_figure(record["ranks"], f"live rank at step {record['step']}")
            payload["alloc/rank_heatmap"] = wandb.Image(fig)
            plt.close(fig)
        for lg in wandb_loggers:
            lg.log_metrics(payload, step=record["step"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, FlexLoRAModule):
            return
        ranks = pl_module.rank_pattern()
        self._write({"step": trainer.global_step, "event": None, "kind": "end", "total_rank": sum(ranks.values()),
                     "budget": None, "ranks": ranks, "importance": {}})
        (self.output_dir / "rank_pattern.json").write_text(json.dumps(ranks, indent=2))
        if self.figures:
            import matplotlib.pyplot as plt

            fig = heatmap_figure(ranks, f"final live rank ({pl_module.allocator_config.name})")
            fig.savefig(self.output_dir / "rank_heatmap.png", dpi=110)
            plt.close(fig)
            fig = dynamics_figure(self.records)
            fig.savefig(self.output_dir / "rank_dynamics.png", dpi=110)
            plt.close(fig)
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                import wandb

                artifact = wandb.Artifact(f"rank_pattern-{lg.experiment.id}", type="rank_pattern")
                artifact.add_file(str(self.output_dir / "rank_pattern.json"))
                lg.experiment.log_artifact(artifact)
                lg.experiment.log({"alloc/final_rank_heatmap": wandb.Image(str(self.output_dir / "rank_heatmap.png"))})
