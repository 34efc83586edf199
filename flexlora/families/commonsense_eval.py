"""Commonsense-reasoning evaluation for any Hugging Face causal LM: log-likelihood ranking and generation.

Log-likelihood ranking scores "the correct answer is <label>" (the training data's output) for every label the
question offers and picks the most likely one; it needs no decoding and has no unparseable answers, so it is
the cheap, deterministic metric for training-time validation. ``generate_predict`` is LLM-Adapters' protocol
(decode, then take the first label word in the text), greedy by default.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
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
@dataclass(frozen=True)
class _Plan:
    """One item's candidate rows, where each row's score begins, and the length of the rows' common prefix."""

    rows: list[list[int]]
    starts: list[int]
    common: int

    low = property(lambda self: min(min(self.starts) - 1, self.common - 1))  # the first logit the prompt pass keeps


def _forward_bytes(config: Any, esize: int, rows: int, width: int, context: int, keep: int) -> int:
    """A rough peak for one no-grad forward of ``rows`` x ``width`` new tokens attending to ``context`` tokens:
    the KV cache, one layer's activations, the attention scores and ``keep`` float32 logits per row."""
    def get(name: str, default: int) -> int:
        return int(getattr(config, name, None) or default)

    hidden, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
    cache = 2 * get("num_hidden_layers", 32) * get("num_key_value_heads", heads) * get("head_dim", hidden // heads)
    activations = width * (6 * hidden + 3 * get("intermediate_size", 4 * hidden)) + cache * context
    return rows * (esize * activations + 8 * (heads * width * context + keep * get("vocab_size", 32000)))


def _default_budget(device: torch.device) -> int:
    """Bytes per scoring forward: a quarter of the free GPU memory, else 128 MiB (on one CPU thread, 4-16
    items per forward are as fast as it gets: fewer pay the per-call overhead, more gain nothing)."""
    return int(torch.cuda.mem_get_info(device)[0] // 4) if device.type == "cuda" else 128 * 2**20


_MAX_PADDING = 0.125  # the share of a batch's tokens that may be padding


def _batches(order: Sequence[int], length: Any, cost: Any, budget: int, max_items: int | None) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (sorted by ``length``) with at most ``max_items``, whose ``cost`` fits
    ``budget`` and whose padding stays under ``_MAX_PADDING`` of their tokens; an item alone is always a batch."""
    chunk: list[int] = []
    for i in order:
        if chunk:
            sizes = [length(j) for j in (*chunk, i)]
            padding = 1 - sum(sizes) / (len(sizes) * max(sizes))
            if len(chunk) == max_items or padding > _MAX_PADDING or cost([*chunk, i]) > budget:
                yield chunk
                chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading ids all rows share (the lexicographic extremes differ first where any two rows do)."""
    lo, hi = min(rows), max(rows)
    return next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))


def _pick(item: EvalItem, scores: list[float]) -> tuple[str, list[float]]:
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))  # the first on ties
    return item.candidates[best], scores


@torch.no_grad()
def _score_rows(model: torch.nn.Module, rows: list[list[int]], starts: list[int], pad_id: int) -> list[float]:
    """Summed log-probabilities of tokens ``rows[r][starts[r]:]`` given what precedes them, in one forward.
    Right padding leaves every real token's context, positions and logits unchanged; only the logits of the
    last positions are computed when the model supports ``logits_to_keep``."""
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


def _shared_prefix(model: torch.nn.Module, plans: Sequence[_Plan], cache_arg: str) -> tuple[int, Any]:
    """(g, KV cache of the first g tokens): the template's head that every item shares, up to the first needed
    logit; (0, None) when the items share nothing. ``_score_shared`` copies the cache for every batch."""
    g = min(_common_prefix([p.rows[0][: p.common] for p in plans]), *(p.low for p in plans))
    if g < 1:
        return 0, None
    ids = torch.tensor([plans[0].rows[0][:g]], device=next(model.parameters()).device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: None})
    return g, getattr(out, cache_arg, None) or out.past_key_values


def _cost(config: Any, esize: int, plans: Sequence[_Plan], g: int | None) -> int:
    """:func:`_forward_bytes` of scoring ``plans`` by :func:`_score_shared` after ``g`` cached tokens, or by
    :func:`_score_rows` when ``g`` is None."""
    if g is None:
        width = max(len(r) for p in plans for r in p.rows)
        rows = sum(len(p.rows) for p in plans)
        return _forward_bytes(config, esize, rows, width, width, width - min(p.low for p in plans))
    width = max(p.common for p in plans) - g
    cost = _forward_bytes(config, esize, len(plans), width, g + width, max(p.common - p.low for p in plans))
    if tails := [len(r) - p.common - 1 for p in plans for r in p.rows if len(r) - p.common >= 2]:
        cost += _forward_bytes(config, esize, len(tails), max(tails), g + width + max(tails), max(tails))
    return cost


@torch.no_grad()
def _score_shared(model: torch.nn.Module, plans: Sequence[_Plan], g: int, base: Any, cache_arg: str,
                  pad_id: int) -> list[list[float]]:
    """Every candidate's score for several items in one or two forwards, the same as :func:`_score_rows`.

    The prompt pass runs each item's common prefix once (after the ``g`` tokens held in ``base``), left-padded
    so that every item's last positions, the only ones whose logits are computed, line up; explicit position
    ids keep RoPE's positions those of the unpadded rows. Position common - 1 already predicts every tail's
    first token, so only candidates whose tail is 2+ tokens wide need the tail pass: their tails but the last
    token, on a copy of the prompts' cache (none of the local sets has such a candidate).
    """
    device = next(model.parameters()).device
    n, width = len(plans), max(p.common for p in plans) - g
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, g + width), dtype=torch.long)
    mask[:, :g] = 1
    pos = torch.full((n, width), g, dtype=torch.long)
    for b, p in enumerate(plans):
        k = p.common - g
        ids[b, width - k :] = torch.tensor(p.rows[0][g : p.common], dtype=torch.long)
        mask[b, g + width - k :] = 1
        pos[b, width - k :] = torch.arange(g, p.common)
    keep = max(p.common - p.low for p in plans)  # item b's position t is logits column t - common_b + keep
    tails = [(b, r) for b, p in enumerate(plans) for r, row in enumerate(p.rows) if len(row) - p.common >= 2]
    cache = None
    if base is not None:
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(n)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                use_cache=cache is not None or bool(tails), logits_to_keep=keep, **{cache_arg: cache})
    logits = [out.logits]
    tail_of = {br: j for j, br in enumerate(tails)}
    if tails:
        cache = getattr(out, cache_arg, None) or out.past_key_values
        cache.batch_select_indices(torch.tensor([b for b, _ in tails], device=device))
        twidth = max(len(plans[b].rows[r]) - plans[b].common - 1 for b, r in tails)
        tids = torch.full((len(tails), twidth), pad_id, dtype=torch.long)
        tmask = torch.cat([mask[[b for b, _ in tails]], torch.zeros((len(tails), twidth), dtype=torch.long)], 1)
        tpos = torch.stack([torch.arange(plans[b].common, plans[b].common + twidth) for b, _ in tails])
        for j, (b, r) in enumerate(tails):
            tail = plans[b].rows[r][plans[b].common : -1]  # the last token is predicted, never read
            tids[j, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            tmask[j, g + width : g + width + len(tail)] = 1
        logits.append(model(input_ids=tids.to(device), attention_mask=tmask.to(device), position_ids=tpos.to(device),
                            use_cache=True, **{cache_arg: cache}).logits)
    terms: list[list[tuple[int, int, int, int, int]]] = [[], []]  # per pass: (row, column, token, item, candidate)
    for b, p in enumerate(plans):
        for r, row in enumerate(p.rows):
            for t in range(p.starts[r], len(row)):
                if t - 1 < p.common:
                    terms[0].append((b, t - 1 - p.common + keep, row[t], b, r))
                else:
                    terms[1].append((tail_of[b, r], t - 1 - p.common, row[t], b, r))
    scores = [[0.0] * len(p.rows) for p in plans]
    for found, step in zip(terms, logits, strict=False):  # no tail pass: no tail terms
        if found:
            at_row, at_col, token = (torch.tensor(x, device=step.device) for x in list(zip(*found, strict=True))[:3])
            values = step[at_row, at_col, token].float() - torch.logsumexp(step.float(), -1)[at_row, at_col]
            for (*_, b, r), value in zip(found, values.tolist(), strict=True):
                scores[b][r] += value
    return scores


def loglik_predict(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[EvalItem], batch_size: int | None = None,
    shared_prefix: bool = True, memory_budget: int | None = None,
) -> list[tuple[str, list[float]]]:
    """Per item: the candidate whose "the correct answer is <label>" is most likely after the prompt (first
    on ties), with every candidate's summed log-probability.

    ``shared_prefix`` (default, for models with a KV cache and ``logits_to_keep``): the template's head that all
    items share runs once, then each item's prompt (with the common part of its candidates) once, several items
    per forward, and a candidate's tokens past that only when they are 2+ tokens wide. Otherwise every candidate
    is a full row, all of an item's candidates in the same forward. Batches hold items of similar length, at
    most ``batch_size`` (None: no cap) and as many as ``memory_budget`` bytes per forward allow (None: see
    :func:`_default_budget`). Both ways give the same scores (tested); results keep the order of ``items``.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pad_id = _pad_id(tokenizer)
    plans = []
    for item in _tokenized(items, tokenizer):
        assert item.prompt_ids is not None and item.candidate_ids is not None
        rows = [list(r) for r in item.candidate_ids]
        plans.append(_Plan(rows, [_response_start(item.prompt_ids, r) for r in rows], _common_prefix(rows)))
    param = next(model.parameters())
    budget = memory_budget or _default_budget(param.device)
    config, esize = getattr(model, "config", None), param.element_size()
    cache_arg = _cache_argument(model)
    shared = shared_prefix and cache_arg is not None and _accepts(model, "logits_to_keep")
    together = [i for i, p in enumerate(plans) if shared and p.common >= 1]
    alone = sorted(set(range(len(items))) - set(together), key=lambda i: max(len(r) for r in plans[i].rows))
    results: list[tuple[str, list[float]] | None] = [None] * len(items)
    with _EvalMode(model):
        if together:
            assert cache_arg is not None
            g, base = _shared_prefix(model, [plans[i] for i in together], cache_arg)
            order = sorted(together, key=lambda i: plans[i].common)
            # left padding needs the shared head: a padded query must see at least one real key
            for chunk in _batches(order, lambda i: plans[i].common - g, lambda c: _cost(
                    config, esize, [plans[i] for i in c], g), budget, batch_size if g else 1):
                scores = _score_shared(model, [plans[i] for i in chunk], g, base, cache_arg, pad_id)
                for i, mine in zip(chunk, scores, strict=True):
                    results[i] = _pick(items[i], mine)
        for chunk in _batches(alone, lambda i: max(len(r) for r in plans[i].rows), lambda c: _cost(
                config, esize, [plans[i] for i in c], None), budget, batch_size):
            scores = _score_rows(model, [r for i in chunk for r in plans[i].rows],
                                 [s for i in chunk for s in plans[i].starts], pad_id)
            for i in chunk:
                results[i] = _pick(items[i], scores[: len(plans[i].rows)])
                scores = scores[len(plans[i].rows) :]
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
        for chunk in (order[i : i + batch_size] for i in range(0, len(order), batch_size)):
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

