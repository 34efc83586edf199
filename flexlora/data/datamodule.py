"""A LightningDataModule for the GLUE tasks and the offline tweets task.

Tokenisation runs once through ``datasets.Dataset.map``; batches are padded dynamically. The training
sampler is seeded per epoch and resumable: the DataModule's checkpoint state records how many batches of
the current epoch were consumed, so a run resumed mid-epoch sees exactly the batches the uninterrupted run
would have seen. It shards by process itself, so the Trainer runs with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from flexlora.data.sources import Columns, load_glue_hub, load_glue_tsv, load_tweets
from flexlora.data.tasks import TaskSpec, task_spec
from flexlora.errors import FlexLoRAError


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
    """GLUE (hub or local TSV) or tweets, tokenised for one backbone's tokenizer."""

    def __init__(
        self,
        task: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        data_dir: str | None = None,
        hub_id: str = "nyu-mll/glue",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.spec: TaskSpec = task_spec(task)
        self.tokenizer = tokenizer
        self.data_dir = data_dir
        self.hub_id = hub_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.splits: dict[str, datasets.Dataset] = {}
        self.collator = DataCollatorWithPadding(tokenizer)
        self._resume: dict[str, int] | None = None
        self._train_sampler: ResumableShuffleSampler | None = None

    @property
    def eval_split_names(self) -> list[str]:
        return [s.name for s in self.spec.eval_splits] if self.spec.name != "tweets" else ["val"]

    def load_raw(self) -> dict[str, Columns]:
        if self.spec.name == "tweets":
            return load_tweets()
        if self.data_dir:
            return load_glue_tsv(self.data_dir, self.spec)
        return load_glue_hub(self.spec, self.hub_id)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load_raw()
        limits = {"train": self.max_train_samples}
        for name, columns in raw.items():
            limit = limits.get(name, self.max_eval_samples)
            dataset = datasets.Dataset.from_dict(columns)
            if limit is not None and limit < len(dataset):
                dataset = dataset.select(range(limit))
            self.splits[name] = dataset.map(
                self._tokenize, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"],
                desc=f"tokenise {self.spec.name}/{name}", load_from_cache_file=False,
            ).rename_column("label", "labels")
        if len(self.splits["train"]) == 0:
            raise FlexLoRAError(f"task {self.spec.name}: the training split is empty")

    def _tokenize(self, batch: Mapping[str, list[Any]]) -> dict[str, Any]:
        pair = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        return self.tokenizer(*pair, truncation=True, max_length=self.max_length)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableShuffleSampler(len(self.splits["train"]), self.seed, rank, world)
        if self._resume is not None:
            sampler.skip_epoch = self._resume["epoch"]
            sampler.skip_samples = self._resume["batches_done"] * self.batch_size
            self._resume = None
        self._train_sampler = sampler
        return self._loader(self.splits["train"], self.batch_size, sampler)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank_world()
        loaders = []
        for name in self.eval_split_names:
            dataset = self.splits[name]
            indices = list(range(rank, len(dataset), world))
            loaders.append(self._loader(dataset, self.eval_batch_size, indices))
        return loaders

    def _loader(self, dataset: datasets.Dataset, batch_size: int, sampler: Any) -> DataLoader:
        # A private generator: building an iterator must not consume the global RNG (exact resume).
        return DataLoader(
            dataset.with_format("torch"), batch_size=batch_size, sampler=sampler, collate_fn=self.collator,
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
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
