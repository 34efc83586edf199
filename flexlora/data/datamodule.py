"""One LightningDataModule for every task family: the family prepares the splits, this module batches them.

The training sampler is seeded per epoch and resumable: the DataModule's checkpoint state records how many
batches of the current epoch were consumed, so a run resumed mid-epoch sees exactly the batches the
uninterrupted run would have seen. It shards by process itself, so the Trainer runs with
``use_distributed_sampler=False``; evaluation splits are sharded without padding (no example counted twice)
and the module gathers their predictions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from flexlora.errors import FlexLoRAError
from flexlora.families import Family, TaskData, make_family


class ResumableShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded by rank, that can skip the batches already consumed."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self.skip_epoch: int | None = None
        self.skip_samples = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = order + order[: len(self) * self.world_size - self.size]
        shard = padded[self.rank :: self.world_size]
        if self.skip_epoch == self.epoch:
            shard = shard[self.skip_samples :]
            self.skip_epoch = None
        return iter(shard)


class TaskDataModule(L.LightningDataModule):
    """Batches the splits of any task family (``task`` and ``backbone`` are the Hydra config nodes; ``family``
    the one ``train.build`` made for the run, or built here when the module is used on its own)."""

    def __init__(
        self, task: Mapping[str, Any], backbone: Mapping[str, Any], seed: int = 0, family: Family | None = None
    ) -> None:
        super().__init__()
        self.family: Family = family if family is not None else make_family(task, backbone, seed)
        self.task = self.family.task  # typed (flexlora.schemas)
        self.batch_size = int(self.task.batch_size)
        self.eval_batch_size = int(self.task.eval_batch_size)
        self.num_workers = int(self.task.num_workers)
        self.seed = seed
        self.data: TaskData | None = None
        self._resume: dict[str, int] | None = None

    @property
    def eval_split_names(self) -> list[str]:
        return self.family.eval_splits

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        data = self.family.load_data()
        if len(data.train) == 0:
            raise FlexLoRAError(f"task {self.family.spec.name}: the training split is empty")
        for name, split in data.evals.items():
            if len(split) == 0:
                raise FlexLoRAError(f"task {self.family.spec.name}: the evaluation split {name!r} is empty")
        self.data = data

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None
        rank, world = self._rank_world()
        sampler = ResumableShuffleSampler(len(self.data.train), self.seed, rank, world)
        if self._resume is not None:
            sampler.skip_epoch = self._resume["epoch"]
            sampler.skip_samples = self._resume["batches_done"] * self.batch_size
            self._resume = None
        return self._loader(self.data.train, self.batch_size, sampler, self.data.train_collate)

    def val_dataloader(self) -> list[DataLoader]:
        assert self.data is not None
        rank, world = self._rank_world()
        return [
            self._loader(self.data.evals[name], self.eval_batch_size,
                         list(range(rank, len(self.data.evals[name]), world)), self.data.eval_collate)
            for name in self.eval_split_names
        ]

    def _loader(self, dataset: Any, batch_size: int, sampler: Any, collate: Any) -> DataLoader:
        # A private generator: building an iterator must not consume the global RNG (exact resume).
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), persistent_workers=self.num_workers > 0,
        )

    # -- checkpoint state: position inside the current epoch -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"])}
