"""Commonsense reasoning on causal LMs (the LLM-Adapters / DoRA / FlexLoRA protocol).

Training: instruction tuning on the LLM-Adapters-format records of ``task.train_sets`` (default: every set
folder with a train.json), Alpaca prompt, loss on the response tokens only, ``cutoff_len`` tokens.
Evaluation, per set in ``task.eval_sets``: ``generate`` (the papers': greedy decoding, the answer is the first
label word of the set in the output) or ``loglik`` (each candidate's "the correct answer is <label>" scored
by log-likelihood; one forward per item: the CPU protocol). Accuracy per set and their average.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexlora.families.base import EvalRecords, Family, TaskData
from flexlora.schemas import BackboneConfig, backbone_config


@functools.lru_cache(maxsize=4)
def _tokenizer(key: tuple[tuple[str, Any], ...]) -> Any:
    from flexlora.backbones.causal_lm import load_causal_lm_tokenizer

    return load_causal_lm_tokenizer(dict(key))


def load_tokenizer(backbone: Mapping[str, Any] | BackboneConfig) -> Any:
    """The backbone's tokenizer, loaded once per process (the data and the evaluation both need it)."""
    backbone = backbone_config(backbone)
    fields = ("name", "pretrained", "gguf_file", "tokenizer")
    return _tokenizer(tuple((k, getattr(backbone, k)) for k in fields))


class ItemBatch:
    """A batch of evaluation items. A plain object on purpose: Lightning moves lists and dataclasses to the
    device element by element (and refuses frozen ones); prompts are tokenised at scoring time instead."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)


def answer_format(label: str) -> str:
    """The answer vocabulary an LLM-Adapters label belongs to: "true/false" (BoolQ), else the label without its
    number ("answer3" -> "answer", "option2" -> "option", "ending4" -> "ending")."""
    if label in ("true", "false"):
        return "true/false"
    return label.rstrip("0123456789") or label


def _sample(items: list[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """A fixed random subset (seed independent of the run's), kept in file order; all when no limit."""
    if limit is None or limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), int(limit)))
    return [items[i] for i in keep]


class CausalLMFamily(Family):
    """``task.split=tune`` holds out ``task.tune_size`` training records (a fixed sample, ``task.tune_seed``) and
    evaluates on them with the loglik protocol (metrics ``tune/accuracy``): hyperparameters are then chosen on
    training data, never on the reported sets."""

    degenerate_check = "constant-per-answer-format"

    @property
    def eval_splits(self) -> list[str]:
        """One evaluation split per set in ``task.eval_sets`` (or ``tune``)."""
        return ["tune"] if self.task.split == "tune" else [str(s) for s in self.task.eval_sets]

    @property
    def data_dir(self) -> str:
        from flexlora.errors import FlexLoRAError

        if not self.task.data_dir:
            raise FlexLoRAError("task=commonsense needs task.data_dir=<folder holding boolq/, piqa/, ...>")
        return str(self.task.data_dir)

    @property
    def train_sets(self) -> list[str]:
        from flexlora.data.commonsense import available_train_sets

        sets = self.task.train_sets
        return [str(s) for s in sets] if sets else available_train_sets(self.data_dir)

    def check(self) -> None:
        from flexlora.data.commonsense import check_sets
        from flexlora.errors import FlexLoRAError

        super().check()
        if self.task.split == "tune":
            check_sets(self.data_dir, [], self.train_sets)
            return
        if not self.eval_splits:
            raise FlexLoRAError("task.eval_sets is empty; name at least one set, e.g. task.eval_sets=[boolq,piqa]")
        if not self.train_sets:
            raise FlexLoRAError(f"{self.data_dir} has no set folder with a train.json; set task.train_sets")
        check_sets(self.data_dir, self.eval_splits, self.train_sets)

    def load_data(self) -> TaskData:
        from pathlib import Path

        from flexlora.data.commonsense import CausalLMCollator, eval_items, read_records, tokenize_for_training

        self.check()
        tokenizer = load_tokenizer(self.backbone)
        root = Path(self.data_dir)
        pool = [(name, r) for name in self.train_sets for r in read_records(root / name / "train.json", name)]
        evals = {}
        if self.task.split == "tune":
            pool, evals["tune"] = self._tune_items(pool, tokenizer)
        records = _sample([r for _, r in pool], self.task.max_train_samples)
        cutoff = int(self.task.cutoff_len)
        train = [{**tokenize_for_training(r, tokenizer, cutoff), "idx": i} for i, r in enumerate(records)]
        for name in self.eval_splits if self.task.split != "tune" else ():
            records = read_records(root / name / "test.json", name)
            keep = _sample(list(range(len(records))), self.task.max_eval_samples)  # before tokenising
            items = eval_items([records[i] for i in keep], name, tokenizer)
            evals[name] = [replace(item, idx=i) for item, i in zip(items, keep, strict=True)]
        return TaskData(train=train, evals=evals, train_collate=CausalLMCollator(tokenizer.pad_token_id),
                        eval_collate=ItemBatch)

    def _tune_items(self, pool: list[tuple[str, Any]], tokenizer: Any) -> tuple[list[tuple[str, Any]], list[Any]]:
        """(training pool without the held-out records, the held-out records as evaluation items). The sample
        depends on ``tune_seed`` only, so every run of a sweep scores on the same items whatever its seed."""
        from flexlora.data.commonsense import eval_items
        from flexlora.errors import FlexLoRAError

        size = int(self.task.tune_size)
        if size >= len(pool):
            raise FlexLoRAError(f"task.tune_size={size} leaves no training record ({len(pool)} in the pool)")
        held = set(random.Random(int(self.task.tune_seed)).sample(range(len(pool)), size))
        items = []
        for name in dict.fromkeys(n for n, _ in pool):
            chosen = [i for i in sorted(held) if pool[i][0] == name]
            for i, item in zip(chosen, eval_items([pool[i][1] for i in chosen], name, tokenizer), strict=True):
                items.append(replace(item, idx=i))
        return [entry for i, entry in enumerate(pool) if i not in held], items

    def build_model(self) -> nn.Module:
        from flexlora.backbones.causal_lm import load_causal_lm

        return load_causal_lm(self.backbone)

    def training_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def batch_size(self, batch: Any) -> int:
        return len(batch) if isinstance(batch, ItemBatch) else int(batch["input_ids"].shape[0])

    def evaluate_batch(self, model: nn.Module, batch: Any, split: str) -> EvalRecords:
        from flexlora.families.commonsense_eval import generate_predict, loglik_predict

        tokenizer = load_tokenizer(self.backbone)
        batch = batch.items
        if self.task.eval_protocol == "generate":
            out = generate_predict(model, tokenizer, batch, len(batch), int(self.task.max_new_tokens))
            predictions, scores = [p for p, _ in out], [text for _, text in out]
        else:
            out = loglik_predict(model, tokenizer, batch, len(batch))
            predictions, scores = [p for p, _ in out], [[round(s, 4) for s in sc] for _, sc in out]
        return EvalRecords([it.idx for it in batch], [it.gold for it in batch], predictions, scores)

    def metrics(self, split: str, records: EvalRecords) -> dict[str, float]:
        from flexlora.families.commonsense_eval import accuracy

        return {f"{split}/accuracy": accuracy(records.prediction, records.label)}

    def degenerate(self, records: EvalRecords) -> str:
        """Constant predictions within any one answer format (see ``answer_format``), not just over the split.

        A pooled split (``task.split=tune`` mixes BoolQ's true/false with ARC's and OBQA's answer1-5) can look
        varied while the model answers one label per format; that is the collapse a selection must not reward.
        """
        from flexlora.metrics import describe_degenerate

        groups: dict[str, list[int]] = {}
        for i, label in enumerate(records.label):
            groups.setdefault(answer_format(str(label)), []).append(i)
        if len(groups) <= 1:
            return super().degenerate(records)
        reasons = []
        for name, rows in sorted(groups.items()):
            line = describe_degenerate([records.prediction[i] for i in rows], False, [records.label[i] for i in rows])
            if len(rows) > 1 and line:
                reasons.append(f"{name} items ({len(rows)} of {len(records.label)}): {line}")
        return "; ".join(reasons)

    def summary_metrics(self, per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        values = [m[f"{s}/accuracy"] for s, m in per_split.items()]
        return {"avg/accuracy": sum(values) / len(values)} if values else {}
