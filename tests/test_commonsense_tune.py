"""task.split=tune for commonsense: held-out training records, never trained on, the same for every seed."""

from __future__ import annotations

import pytest

from flexlora.families.causal_lm import CausalLMFamily
from tests.commonsense_fixtures import backbone, record, write_json


@pytest.fixture
def data_dir(tmp_path):
    for name, answers in (("boolq", ["true", "false"]), ("openbookqa", ["answer1", "answer2", "answer3", "answer4"])):
        records = []
        for i in range(40):
            answer = answers[i % len(answers)]
            if name == "boolq":
                records.append(record(f"Please answer true or false, question: q{i}?\n\nAnswer format: true/false",
                                      answer))
            else:
                records.append(record(f"Question {i}\n\nAnswer format: answer1/answer2/answer3/answer4", answer))
        write_json(tmp_path / name / "train.json", records)
        write_json(tmp_path / name / "test.json", records[:5])
    return tmp_path


def _family(data_dir, seed: int, **task) -> CausalLMFamily:
    spec = {"name": "commonsense", "data_dir": str(data_dir), "split": "tune", "tune_size": 12, "tune_seed": 3,
            "eval_sets": ["boolq"], **task}
    return CausalLMFamily(spec, backbone("tiny_llama"), seed)


def test_tune_split_holds_out_training_records(data_dir):
    family = _family(data_dir, seed=1)
    family.check()
    assert family.eval_splits == ["tune"]
    data = family.load_data()
    tune = data.evals["tune"]
    assert len(tune) == 12 and len(data.train) == 80 - 12
    assert {item.set_name for item in tune} == {"boolq", "openbookqa"}  # drawn from the whole pool
    held_prompts = {item.prompt for item in tune}
    from flexlora.data.commonsense import generate_prompt, read_records

    trained = set()
    for name in ("boolq", "openbookqa"):
        for rec in read_records(data_dir / name / "train.json", name):
            trained.add(generate_prompt(rec["instruction"], rec.get("input") or ""))
    assert held_prompts <= trained
    other_seed = _family(data_dir, seed=2).load_data().evals["tune"]
    assert [i.prompt for i in other_seed] == [i.prompt for i in tune], "the held-out items must not follow the seed"
    assert [i.idx for i in tune] == sorted(i.idx for i in tune)


def test_tune_split_excludes_held_out_records_from_training(data_dir):
    family = _family(data_dir, seed=1)
    data = family.load_data()
    held = {item.prompt for item in data.evals["tune"]}
    from flexlora.families.causal_lm import load_tokenizer

    tokenizer = load_tokenizer(backbone("tiny_llama"))
    decoded = {tokenizer.decode(ex["input_ids"], skip_special_tokens=True) for ex in data.train}
    assert not any(any(prompt.strip()[:40] in text for text in decoded) for prompt in held)


def test_tune_size_must_leave_training_data(data_dir):
    from flexlora.errors import FlexLoRAError

    with pytest.raises(FlexLoRAError, match="tune_size"):
        _family(data_dir, seed=1, tune_size=80).load_data()


def test_a_pooled_split_is_degenerate_when_one_answer_format_is_constant(data_dir):
    """The SmolLM2 study's tune run at FlexLoRA's lr 3.2e-2 answered "answer3" for all 264 multiple-choice
    items while varying on BoolQ, so the pooled split passed the old whole-split check."""
    from flexlora.families.base import EvalRecords

    family = _family(data_dir, seed=1)
    labels = ["true", "false", "true", "false", "answer1", "answer2", "answer3", "answer4"]
    varied = EvalRecords(list(range(8)), labels, ["true", "false", "false", "true", "answer1", "answer3", "answer3",
                                                  "answer2"])
    assert family.degenerate(varied) == ""
    collapsed = EvalRecords(list(range(8)), labels, ["true", "false", "false", "true", *["answer3"] * 4])
    reason = family.degenerate(collapsed)
    assert reason.startswith("answer items (4 of 8): constant predictions") and "true/false" not in reason
    one_format = EvalRecords(list(range(4)), labels[:4], ["true"] * 4)  # a single set: the whole-split check
    assert family.degenerate(one_format).startswith("constant predictions")


def test_a_selection_never_chooses_a_degenerate_run(tmp_path):
    import json

    from flexlora.studies import run_score

    (tmp_path / "metrics.json").write_text(json.dumps({"final": {"tune/accuracy": 0.475},
                                                       "degenerate": {"tune": True}}))
    assert run_score(tmp_path, "tune/accuracy").selection_value == float("-inf")
    (tmp_path / "metrics.json").write_text(json.dumps({"final": {"tune/accuracy": 0.475},
                                                       "degenerate": {"tune": False}}))
    assert run_score(tmp_path, "tune/accuracy").selection_value == 0.475
