"""Shared fixtures. Tests never touch the network: the hub is forced offline and W&B to offline mode."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from flexlora.conf_store import register

register()  # the config schemas and resolvers, as run.py registers them, for every compose in the tests

REPO = Path(__file__).resolve().parents[1]


def shared_data(*parts: str) -> Path | None:
    """A folder of the shared offline data (``shared/data/...``) beside the checkout, above it, or in /work:
    CI clones the project anywhere, so tests never assume where the shared folder is."""
    env = os.environ.get("FLEXLORA_SHARED_DATA")
    roots = ([Path(env)] if env else []) + [p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent,
                                                                             Path("/work"))]
    return next((r.joinpath(*parts) for r in roots if r.joinpath(*parts).exists()), None)


def glue_root() -> Path | None:
    """Real GLUE TSVs: $FLEXLORA_GLUE_DIR, else the shared ``glue`` folder (:func:`shared_data`)."""
    env = os.environ.get("FLEXLORA_GLUE_DIR")
    if env and (Path(env) / "RTE" / "train.tsv").is_file():
        return Path(env)
    root = shared_data("glue")
    return root if root is not None and (root / "RTE" / "train.tsv").is_file() else None


@pytest.fixture(scope="session")
def shared_tiny_run(tmp_path_factory) -> Path:
    """One tiny FlexLoRA run for the whole session (``debug=tiny``: tiny DeBERTa on the tweets, 30 steps with
    allocation events, W&B offline), read by the export, aggregate and W&B tests instead of a run each. Tests
    read it and never write into it."""
    from flexlora.train import train
    from tests.helpers import compose_config

    run_dir = tmp_path_factory.mktemp("shared") / "run"
    before = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"  # the W&B test reads the offline files back
    try:
        train(compose_config("debug=tiny", "logger=wandb", "experiment_name=wbtest", output_dir=run_dir))
    finally:
        if before is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = before
    return run_dir


@pytest.fixture(scope="session")
def real_glue_dir() -> Path:
    root = glue_root()
    if root is None:
        pytest.skip("real GLUE TSVs not found (set FLEXLORA_GLUE_DIR to the folder holding RTE/, MRPC/, ...)")
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """Real GLUE when present; otherwise a small synthetic RTE folder in canonical TSV layout, so the
    training tests still run (only the row-count tests need the real files)."""
    root = glue_root()
    if root is not None:
        return root
    import random

    root = tmp_path_factory.mktemp("glue")
    (root / "RTE").mkdir()
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "runs", "sleeps", "on", "under", "big", "small", "red", "blue", "house", "tree",
             "river", "city"]
    for name, rows in (("train.tsv", 400), ("dev.tsv", 80)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(rows):
            a = " ".join(rng.choices(words, k=rng.randint(5, 20)))
            b = " ".join(rng.choices(words, k=rng.randint(3, 8)))
            lines.append(f"{i}\t{a}\t{b}\t{rng.choice(['entailment', 'not_entailment'])}")
        (root / "RTE" / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_deberta():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=64, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], position_buckets=16, type_vocab_size=0,
                             pooler_hidden_size=16, num_labels=3)
    return DebertaV2ForSequenceClassification(config).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=2,
                        pad_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


@pytest.fixture
def token_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 10), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------- the commonsense tests' tiny causal LM
@pytest.fixture(scope="module")
def tok():
    from flexlora.backbones.causal_lm import load_causal_lm_tokenizer
    from tests.commonsense_fixtures import backbone

    return load_causal_lm_tokenizer(backbone("tiny_llama"))


@pytest.fixture(scope="module")
def lm():
    from flexlora.backbones.causal_lm import load_causal_lm
    from tests.commonsense_fixtures import backbone

    torch.manual_seed(0)
    return load_causal_lm(backbone("tiny_llama"))
