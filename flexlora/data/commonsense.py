"""Commonsense-reasoning data in the LLM-Adapters format (the protocol of LLM-Adapters, DoRA and FlexLoRA).

Each set is a folder ``<data_dir>/<name>/`` holding ``test.json`` and possibly ``train.json``: a JSON list of
``{"instruction", "input", "output", "answer"}`` records whose ``output`` is "the correct answer is <answer>".
Everything here is plain data and tokenisation, so the same code serves training, evaluation and tests.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexlora.errors import FlexLoRAError

# The label words per set, as LLM-Adapters' extract_answer knows them.
LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}
# The order of the papers' result tables.
ALL_SETS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
)
# What the training data's ``output`` says; log-likelihood scoring scores exactly this text per label.
RESPONSE_TEMPLATE = "the correct answer is {}"
PROMPT_STYLES = ("llm_adapters", "clean")

# LLM-Adapters' finetune.py (copied unchanged by DoRA) builds its prompt from an indented triple-quoted
# f-string, so every line after the first carries 16 spaces, the blank lines too, and the first line ends in
# one space (with input) or two (without). Kept byte-exact: the papers' models were trained on it.
_INDENT = " " * 16
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_FORMAT_LINE = re.compile(r"Answer format:\s*([\w/\-]+)\s*$")


def generate_prompt(instruction: str, input: str = "", output: str = "", *, style: str = "llm_adapters") -> str:
    """The Alpaca-style prompt of LLM-Adapters; ``output=""`` gives the user prompt that training masks.

    ``style="llm_adapters"`` reproduces finetune.py's whitespace exactly (the indentation is part of what the
    papers trained on). ``style="clean"`` is the de-indented form that is usually quoted (no space after the
    with-input head, two after the no-input head); training and evaluation must use the same style.
    """
    if style == "llm_adapters":
        if input:
            return (
                f"{_HEAD_INPUT} \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
                f"{_INDENT}### Input:\n{_INDENT}{input}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{output}"
            )
        return (
            f"{_HEAD_NO_INPUT}  \n\n{_INDENT}### Instruction:\n{_INDENT}{instruction}\n{_INDENT}\n"
            f"{_INDENT}### Response:\n{_INDENT}{output}"
        )
    if style == "clean":
        if input:
            return f"{_HEAD_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
        return f"{_HEAD_NO_INPUT}  \n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
    raise FlexLoRAError(f"prompt style {style!r} is unknown; use one of {', '.join(PROMPT_STYLES)}")


# ---------------------------------------------------------------- reading and checking files
def _present_sets(parent: Path, split: str = "test") -> list[str]:
    """Sub-folders of ``parent`` that hold ``<split>.json``, known sets first in table order."""
    if not parent.is_dir():
        return []
    names = [p.name for p in parent.iterdir() if (p / f"{split}.json").is_file()]
    known = [s for s in ALL_SETS if s in names]
    return known + sorted(n for n in names if n not in ALL_SETS)


def _missing_message(path: Path) -> str:
    folder, parent = path.parent, path.parent.parent
    if not parent.is_dir():
        return (
            f"{path}: the data folder {parent} does not exist; point the commonsense data directory at the folder "
            "that holds boolq/, piqa/, ... (each with test.json, see shared/data/commonsense/README.md)"
        )
    present = ", ".join(_present_sets(parent, path.stem)) or "none"
    where = f"folder {folder.name}/ has no {path.name}" if folder.is_dir() else f"there is no folder {folder.name}/"
    return f"{path}: {where}; sets with {path.name} in {parent}: {present}"


def read_records(path: Path, set_name: str | None = None) -> list[dict[str, str]]:
    """All records of one LLM-Adapters JSON file, validated so that a broken file fails before training.

    With ``set_name`` every ``answer`` must be one of that set's label words. ``input`` and ``output`` may be
    absent (read as ""); the returned records always have all four keys.
    """
    path = Path(path)
    if set_name is not None and set_name not in LABELS:
        raise FlexLoRAError(f"{path}: unknown commonsense set {set_name!r}; known sets: {', '.join(ALL_SETS)}")
    if not path.is_file():
        raise FlexLoRAError(_missing_message(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FlexLoRAError(f"{path}: not UTF-8 (byte {err.start}: {err.reason}); re-save the file as UTF-8") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FlexLoRAError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno} ({err.msg}); "
            "the file must be one JSON list of records"
        ) from err
    if not isinstance(data, list):
        raise FlexLoRAError(
            f"{path}: expected a JSON list of records {{instruction, input, output, answer}}, "
            f"got a JSON {type(data).__name__}"
        )
    labels = LABELS.get(set_name) if set_name else None
    records: list[dict[str, str]] = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise FlexLoRAError(f"{where}: expected an object with instruction and answer, got {type(rec).__name__}")
        for key in ("instruction", "answer"):
            if not isinstance(rec.get(key), str):
                got = "it is missing" if key not in rec else f"got {type(rec[key]).__name__}"
                raise FlexLoRAError(f"{where}: {key!r} must be a string ({got}); fix or remove the record")
        for key in ("input", "output"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise FlexLoRAError(f"{where}: {key!r} must be a string (got {type(rec[key]).__name__})")
        answer = rec["answer"]
        if labels is not None and answer not in labels:
            raise FlexLoRAError(
                f"{where}: answer {answer!r} is not a {set_name} label ({'/'.join(labels)}); "
                "is this file in the right folder?"
            )
        output = rec.get("output") or RESPONSE_TEMPLATE.format(answer)
        records.append({"instruction": rec["instruction"], "input": rec.get("input") or "", "output": output,
                        "answer": answer})
    return records


def check_sets(data_dir: Path | str, eval_sets: Iterable[str], train_sets: Iterable[str] = ()) -> None:
    """Fail before any training when an evaluation set lacks test.json or a training set lacks train.json."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FlexLoRAError(
            f"commonsense data folder {root} does not exist; point it at the folder that holds boolq/, piqa/, ... "
            "(see shared/data/commonsense/README.md)"
        )
    for name in eval_sets:
        if name not in LABELS:
            raise FlexLoRAError(f"evaluation set {name!r} is unknown; known sets: {', '.join(ALL_SETS)}")
        path = root / name / "test.json"
        if not path.is_file():
            raise FlexLoRAError(_missing_message(path))
    for name in train_sets:
        path = root / name / "train.json"
        if not path.is_file():
            raise FlexLoRAError(_missing_message(path))


def available_train_sets(data_dir: Path | str) -> list[str]:
    """Folders of ``data_dir`` that hold a train.json, in the papers' table order (unknown names last)."""
    return _present_sets(Path(data_dir), "train")


# ---------------------------------------------------------------- tokenisation
_AFFIXES: weakref.WeakKeyDictionary[Any, tuple[list[int], list[int]]] = weakref.WeakKeyDictionary()


def _affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text by itself (BOS; or [CLS] ... [SEP])."""
    try:
        return _AFFIXES[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "probe text"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), 0)
    result = (list(full[:start]), list(full[start + len(bare) :]))
    with contextlib.suppress(TypeError):  # not weakly referenceable: recompute next time
        _AFFIXES[tokenizer] = result
    return result


def encode(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of ``text`` with the tokenizer's leading special tokens (BOS) but never a trailing one.

    Causal-LM training decides about EOS itself, and a prompt must be a prefix of prompt + response; a
    tokenizer that appends [SEP]/EOS on its own (WordPiece, some chat tokenizers) would break both.
    """
    return encode_batch(tokenizer, [text], max_length)[0]


def encode_batch(tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """``encode`` for many texts in one tokenizer call (several times faster than one call per text)."""
    if not texts:
        return []
    prefix, _ = _affixes(tokenizer)
    bare = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(prefix + list(ids))[:max_length] if max_length is not None else prefix + list(ids) for ids in bare]


def tokenize_for_training(
    record: Mapping[str, str], tokenizer: Any, cutoff_len: int = 256, *, style: str = "llm_adapters"
) -> dict[str, list[int]]:
    """LLM-Adapters' training example: the full prompt truncated to ``cutoff_len``, EOS appended when it fits,
    and the user-prompt tokens masked with -100 so that only the response is learnt (train_on_inputs=False)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FlexLoRAError("the tokenizer has no EOS token; set one (load_causal_lm_tokenizer does) before training")
    instruction, inp = record["instruction"], record.get("input") or ""
    output = record.get("output") or RESPONSE_TEMPLATE.format(record["answer"])
    ids = encode(tokenizer, generate_prompt(instruction, inp, output, style=style), cutoff_len)
    if (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    user_len = len(encode(tokenizer, generate_prompt(instruction, inp, "", style=style), cutoff_len))
    masked = min(user_len, len(ids))
    labels = [-100] * masked + ids[masked:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class CausalLMCollator:
    """Right-pads tokenised examples into a batch; scalar fields such as ``idx`` become a 1-D tensor."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise FlexLoRAError("CausalLMCollator needs a pad token id; the tokenizer has none (set pad = EOS)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = self._pad_value(key)
                batch[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values], dtype=torch.long)
            elif isinstance(values[0], (bool, int)) or (torch.is_tensor(values[0]) and values[0].ndim == 0):
                batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
            else:
                batch[key] = values
        return batch


# ---------------------------------------------------------------- evaluation items
@dataclass(frozen=True)
class EvalItem:
    """One test question: its prompt (response left empty), gold label, the label words to choose from and
    its set (which decides how an answer is extracted from generated text).

    ``prompt_ids``/``candidate_ids``/``tokenizer_key`` are filled when a tokenizer was given, so repeated
    evaluations do not tokenise again; ``candidate_ids[k]`` is prompt + "the correct answer is <candidates[k]>".
    """

    idx: int
    prompt: str
    gold: str
    candidates: tuple[str, ...]
    set_name: str
    prompt_ids: tuple[int, ...] | None = None
    candidate_ids: tuple[tuple[int, ...], ...] | None = None
    tokenizer_key: str | None = None


def tokenizer_key(tokenizer: Any) -> str:
    """Identifies a tokenizer well enough to tell whether cached ids belong to it."""
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def candidates_for(record: Mapping[str, str], set_name: str) -> tuple[str, ...]:
    """The labels the question offers: its "Answer format: a/b/c" line when it names labels of the set (ARC
    has questions with 3 and 5 options), else all the set's labels."""
    labels = LABELS[set_name]
    match = _FORMAT_LINE.search(record["instruction"].strip())
    if match:
        offered = tuple(w for w in match.group(1).split("/") if w)
        if offered and all(w in labels for w in offered) and record["answer"] in offered:
            return offered
    return labels


def eval_items(
    records: Sequence[Mapping[str, str]], set_name: str, tokenizer: Any | None = None, *, style: str = "llm_adapters"
) -> list[EvalItem]:
    """Evaluation items in test.json order (``idx`` is the record index)."""
    if set_name not in LABELS:
        raise FlexLoRAError(f"unknown commonsense set {set_name!r}; known sets: {', '.join(ALL_SETS)}")
    key = tokenizer_key(tokenizer) if tokenizer is not None else None
    prompts = [generate_prompt(r["instruction"], r.get("input") or "", "", style=style) for r in records]
    candidates = [candidates_for(r, set_name) for r in records]
    prompt_ids: list[tuple[int, ...] | None] = [None] * len(records)
    candidate_ids: list[tuple[tuple[int, ...], ...] | None] = [None] * len(records)
    if tokenizer is not None:
        texts = [p + RESPONSE_TEMPLATE.format(c) for p, cs in zip(prompts, candidates, strict=True) for c in cs]
        flat = iter(encode_batch(tokenizer, texts))
        prompt_ids = [tuple(ids) for ids in encode_batch(tokenizer, prompts)]
        candidate_ids = [tuple(tuple(next(flat)) for _ in cs) for cs in candidates]
    return [
        EvalItem(i, prompts[i], rec["answer"], candidates[i], set_name, prompt_ids[i], candidate_ids[i], key)
        for i, rec in enumerate(records)
    ]
