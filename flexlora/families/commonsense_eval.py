"""Commonsense-reasoning evaluation for any Hugging Face causal LM: log-likelihood ranking and generation.

Log-likelihood ranking scores "the correct answer is <label>" (the training data's output) for every label the
question offers and picks the most likely one; it needs no decoding and has no unparseable answers, so it is
the cheap, deterministic metric for training-time validation. ``generate_predict`` is LLM-Adapters' protocol
(decode, then take the first label word in the text), greedy by default.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import GenerationConfig

from flexlora.data.commonsense import LABELS, RESPONSE_TEMPLATE, EvalItem, encode_batch, tokenizer_key
from flexlora.errors import FlexLoRAError

# LLM-Adapters' extract_answer: one regex per set, case-sensitive, first match wins. Its social_i_qa,
# ARC and openbookqa branch shares the pattern answer1..answer5, so e.g. "answer4" counts (as wrong) for SIQA.
_ANSWER_N = ("answer1", "answer2", "answer3", "answer4", "answer5")
_EXTRACT: dict[str, re.Pattern[str]] = {
    name: re.compile("|".join(_ANSWER_N if labels[0] == "answer1" else labels)) for name, labels in LABELS.items()
}


def extract_answer(set_name: str, text: str) -> str | None:
    """The first label word of the set in ``text``, or None when there is none."""
    pattern = _EXTRACT.get(set_name)
    if pattern is None:
        raise FlexLoRAError(f"unknown commonsense set {set_name!r}; known sets: {', '.join(LABELS)}")
    found = pattern.findall(text.strip())
    return found[0] if found else None


def accuracy(predictions: Sequence[str | None], golds: Sequence[str]) -> float:
    """Share of exact matches; a None prediction (nothing extracted) is wrong. NaN for no items."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        return math.nan
    return sum(p is not None and p == g for p, g in zip(predictions, golds, strict=True)) / len(golds)


# ---------------------------------------------------------------- helpers
def _response_start(prompt_ids: Sequence[int], full_ids: Sequence[int]) -> int:
    """Where the response's tokens begin in ``full_ids``: after the prompt when the prompt's ids are a prefix,
    else at the first position where the two differ (the tokenizer merged across the boundary). Never 0, as
    the first token has no context to be scored from."""
    n = len(prompt_ids)
    if list(full_ids[:n]) == list(prompt_ids):
        start = n
    else:
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b), n)
    return max(1, min(start, len(full_ids)))


def _tokenized(items: Sequence[EvalItem], tokenizer: Any) -> list[EvalItem]:
    """The items with prompt and candidate ids from this tokenizer (kept when already theirs)."""
    key = tokenizer_key(tokenizer)
    todo = [i for i, item in enumerate(items) if item.tokenizer_key != key or item.candidate_ids is None]
    if not todo:
        return list(items)
    prompts = encode_batch(tokenizer, [items[i].prompt for i in todo])
    texts = [items[i].prompt + RESPONSE_TEMPLATE.format(c) for i in todo for c in items[i].candidates]
    flat = iter(encode_batch(tokenizer, texts))
    out = list(items)
    for i, prompt_ids in zip(todo, prompts, strict=True):
        rows = tuple(tuple(next(flat)) for _ in items[i].candidates)
        out[i] = replace(items[i], prompt_ids=tuple(prompt_ids), candidate_ids=rows, tokenizer_key=key)
    return out


def _chunks(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i : i + size])


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise FlexLoRAError("the tokenizer has neither a pad nor an EOS token; load it with load_causal_lm_tokenizer")
    return int(pad)


class _EvalMode:
    """eval() + no_grad for the block; afterwards every submodule gets back its own training flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        for module, training in self.modes:
            module.training = training


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_argument(model: torch.nn.Module) -> str | None:
    """The keyword a model takes its KV cache by (transformers 5: ``cache``; before: ``past_key_values``)."""
    return next((name for name in ("cache", "past_key_values") if _accepts(model, name)), None)


# ---------------------------------------------------------------- log-likelihood ranking
@torch.no_grad()
def _score_rows(model: torch.nn.Module, rows: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    """Summed log-probabilities of tokens ``rows[r][starts[r]:]`` given what precedes them, in one forward.

    Right padding leaves every real token's context, positions and logits unchanged, so scores do not
    depend on what else is in the batch; only the logits of the last positions are computed when the model
    supports ``logits_to_keep``.
    """
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    first = min(starts) - 1  # the first position whose logits are needed
    keep = width - first
    for name in ("logits_to_keep", "num_logits_to_keep"):  # the latter before transformers 4.50
        if _accepts(model, name):
            kwargs[name] = keep
            break
    logits = model(**kwargs).logits
    offset = width - logits.shape[1]  # logits[:, j] belongs to position offset + j
    scores = []
    for r, row in enumerate(rows):
        s, n = starts[r], len(row)
        if s >= n:
            scores.append(0.0)
            continue
        step = logits[r, s - 1 - offset : n - 1 - offset].float().log_softmax(-1)
        target = torch.tensor(row[s:n], device=step.device).unsqueeze(1)
        scores.append(step.gather(1, target).sum().item())
    return scores


@torch.no_grad()
def _score_item_shared_prefix(model: torch.nn.Module, rows: list[list[int]], starts: list[int]) -> list[float]:
    """The same scores as :func:`_score_rows` for one item's candidates, with the prompt run once.

    The candidates share the prompt (and "the correct answer is"): that common prefix goes through the model
    once with a KV cache, the cache is repeated per candidate, and only the differing suffixes are run. On a
    CPU this is 3-4x fewer token forwards for 4-5 candidates of a 150-token prompt.
    """
    device = next(model.parameters()).device
    common = min(len(r) for r in rows)
    for i in range(common):
        if any(r[i] != rows[0][i] for r in rows):
            common = i
            break
    first = min(starts) - 1  # the first position whose logits a score needs
    common = max(common, first + 1)  # a prefix ending before every needed logit gives nothing to share
    if common >= max(len(r) for r in rows) or any(len(r) < common or r[:common] != rows[0][:common] for r in rows):
        return _score_rows(model, rows, starts, 0)
    prefix = torch.tensor([rows[0][:common]], device=device)
    out = model(input_ids=prefix, use_cache=True, logits_to_keep=common - first)
    prefix_logp = out.logits[0].float().log_softmax(-1)  # row j predicts token first + j + 1
    cache_arg = _cache_argument(model)
    cache = getattr(out, cache_arg)
    width = max(len(r) for r in rows) - common
    suffix = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), common + width), dtype=torch.long)
    for r, row in enumerate(rows):
        tail = row[common:]
        suffix[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        mask[r, : common + len(tail)] = 1
    cache.batch_repeat_interleave(len(rows))
    suffix_logp = model(input_ids=suffix.to(device), attention_mask=mask.to(device), use_cache=True,
                        **{cache_arg: cache}).logits.float().log_softmax(-1)  # [r, j] predicts suffix token j + 1
    scores = []
    for r, row in enumerate(rows):
        total = 0.0
        for t in range(starts[r], len(row)):
            logp = prefix_logp[t - 1 - first] if t - 1 < common else suffix_logp[r, t - 1 - common]
            total += float(logp[row[t]])
        scores.append(total)
    return scores


def loglik_predict(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[EvalItem], batch_size: int = 4,
    shared_prefix: bool = True,
) -> list[tuple[str, list[float]]]:
    """Per item: the candidate whose "the correct answer is <label>" is most likely after the prompt (first
    on ties), with every candidate's summed log-probability.

    ``shared_prefix`` (default, for models with a KV cache): per item, the prompt runs once and only the
    candidates' differing suffixes run per candidate. Otherwise ``batch_size`` counts items per forward call; all
    candidates of an item are rows of the same call, and items are grouped by length to waste little on padding.
    Both give the same scores (tested); the results keep the order of ``items``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    plans = []
    for item in _tokenized(items, tokenizer):
        assert item.prompt_ids is not None and item.candidate_ids is not None
        rows = [list(r) for r in item.candidate_ids]
        plans.append((rows, [_response_start(item.prompt_ids, r) for r in rows]))
    order = sorted(range(len(items)), key=lambda i: max(len(r) for r in plans[i][0]))
    results: list[tuple[str, list[float]] | None] = [None] * len(items)
    shared = shared_prefix and _cache_argument(model) is not None and _accepts(model, "logits_to_keep")
    with _EvalMode(model):
        for chunk in _chunks(order, 1 if shared else batch_size):
            rows = [row for i in chunk for row in plans[i][0]]
            starts = [s for i in chunk for s in plans[i][1]]
            if shared:
                scores = _score_item_shared_prefix(model, rows, starts)
            else:
                scores = _score_rows(model, rows, starts, pad_id)
            pos = 0
            for i in chunk:
                k = len(plans[i][0])
                mine = scores[pos : pos + k]
                pos += k
                best = max(range(k), key=lambda j, mine=mine: (mine[j], -j))
                results[i] = (items[i].candidates[best], mine)
    return [r for r in results if r is not None]


# ---------------------------------------------------------------- generation (LLM-Adapters' protocol)
def generate_predict(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[EvalItem],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    *,
    num_beams: int = 1,
) -> list[tuple[str | None, str]]:
    """Per item: (the first label word in the decoded response or None, the decoded response).

    The prompt's ids are cut back to where they stop agreeing with prompt + response, so a prompt whose last
    token the tokenizer would merge with the response starts as in training. Batches are left-padded (every
    row's continuation starts at the same column) and built here, so the tokenizer's own padding side is never
    changed. LLM-Adapters decoded with 4 beams; ``num_beams=1`` is greedy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    prompts = []
    for item in _tokenized(items, tokenizer):
        assert item.prompt_ids is not None and item.candidate_ids is not None
        # Token healing: when the tokenizer merges the prompt's trailing whitespace into the response (BPE does
        # with LLM-Adapters' indented template), start from the ids that training saw before the response.
        first = item.candidate_ids[0]
        prompts.append(list(first[: _response_start(item.prompt_ids, first)]))
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, pad_token_id=pad_id, use_cache=True,
        eos_token_id=eos if eos is not None else getattr(model.config, "eos_token_id", None),
    )
    device = next(model.parameters()).device
    results: list[tuple[str | None, str] | None] = [None] * len(items)
    with _EvalMode(model):
        for chunk in _chunks(order, batch_size):
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                n = len(prompts[i])
                ids[r, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                results[i] = (extract_answer(items[i].set_name, text), text)
    return [r for r in results if r is not None]

