"""Shared pieces of the commonsense tests: the data folder, the tiny LLaMA and its tokenizer, record helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexlora.data.commonsense import RESPONSE_TEMPLATE
from flexlora.errors import FlexLoRAError

REPO = Path(__file__).resolve().parents[1]
README_TEST_COUNTS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
                      "ARC-Easy": 2376, "openbookqa": 500}
README_TRAIN_COUNTS = {"boolq": 9427, "ARC-Easy": 2251, "openbookqa": 4957}


def commonsense_root() -> Path | None:
    """$FLEXLORA_COMMONSENSE_DIR, else the shared commonsense data (see tests/conftest.py: shared_data)."""
    from tests.conftest import shared_data

    env = os.environ.get("FLEXLORA_COMMONSENSE_DIR")
    if env and (Path(env) / "boolq" / "test.json").is_file():
        return Path(env)
    return shared_data("commonsense")


def backbone(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml"))


def record(instruction: str = "Please answer the following question with true or false, question: is it?\n\n"
           "Answer format: true/false", answer: str = "true", input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": RESPONSE_TEMPLATE.format(answer), "answer": answer}


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(FlexLoRAError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message
