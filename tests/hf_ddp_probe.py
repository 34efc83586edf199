"""Run by tests/test_hf_trainer.py under torchrun (2 CPU processes, gloo): FlexLoRA through the HF Trainer.

Usage: torchrun --nproc_per_node 2 tests/hf_ddp_probe.py OUT_PREFIX [broadcast|local]
Each process sees its own half of the data, so its local importances differ; rank 1 also skews its lambdas
after every optimizer step. The plan must still come from rank 0: both ranks write their event log and their
final rank pattern (OUT_PREFIX.rank<r>), and the test compares them. ``local`` (every rank plans for itself, no
broadcast) is the control that shows the skew would make the ranks disagree.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexlora.adapters import inject
from flexlora.allocators.config import FlexLoRAConfig
from flexlora.engine import RankAllocationEngine
from flexlora.integrations.transformers import FlexLoRATrainer


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] % 2)}


class Skew(TrainerCallback):
    """Rank 1 only: after every optimizer step its lambdas drift, so its own plans would differ."""

    def __init__(self, adapters) -> None:
        self.adapters = adapters

    def on_optimizer_step(self, args, state, control, **kwargs):
        if int(os.environ.get("RANK", "0")) == 1:
            with torch.no_grad():
                for i, layer in enumerate(self.adapters.values()):
                    layer.lora_E.mul_(1 + 0.5 * (i % 3))


def main(prefix: str, mode: str) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=2,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = FlexLoRAConfig(rank=4, alpha=8.0, orth_reg=0.1, t_init=4, t_final=4, delta_t=2, budget_per_event=1)
    adapters = inject(model, ["query", "key", "value"], head_modules=["classifier"], **config.adapter_kwargs())
    local = {"broadcast": lambda value: value, "is_main": True} if mode == "local" else {}
    engine = RankAllocationEngine(adapters, config, seed=0, **local)
    args = TrainingArguments(output_dir=f"{prefix}.trainer", max_steps=24, per_device_train_batch_size=8,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = FlexLoRATrainer(engine=engine, model=model, args=args, train_dataset=Data())
    trainer.add_callback(Skew(adapters))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    Path(f"{prefix}.rank{rank}").write_text(json.dumps({
        "world": world, "events": engine.events, "ranks": engine.rank_pattern(),
        "log": [r["ranks"] for r in engine.event_log.events()],
    }))
    if torch.distributed.is_initialized():
        # Leave without tearing gloo down. Its teardown can deadlock (the DDP reducer's ProcessGroupGloo destructor
        # joins a worker that waits for the GIL the destructor holds) or abort at interpreter exit ("terminate
        # called without an active exception", seen once in CI). Both ranks first meet on the launcher's store, so
        # neither leaves while the other still has a collective pending; the files are written by then.
        store = torch.distributed.distributed_c10d._get_default_store()
        store.add("probe_done", 1)
        while store.add("probe_done", 0) < world:
            time.sleep(0.01)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "broadcast")
