"""Run folders -> the papers' result tables (Markdown, CSV, PNG), or a paired comparison of two methods.

    flexlora-aggregate multirun/<date_time> [more folders or metrics.json files] [--out DIR]
    flexlora-aggregate multirun/<date_time> --compare flexlora,adalora

Every complete ``metrics.json`` below the given paths is one run (unreadable or metric-less ones are listed as
unfinished). Runs are grouped by task family into the papers' tables, one per backbone: GLUE (+ tweets, the
AdaLoRA paper's Table 1 columns), commonsense reasoning (FlexLoRA / DoRA), VTAB-1k (with group means) and rank
recovery (per teacher spectrum). One row per allocator (``--rows`` adds config keys, e.g.
``--rows allocator.name,allocator.importance``), one column per task with its official metric. A cell is mean ±
sample std (ddof=1) over seeds, x100, with the seed count: ``85.21 ± 0.40 (n=3)``; ``†`` marks a cell with a
degenerate run (constant predictions), listed under the table. ``Avg`` averages one number per task (MNLI m/mm
and QQP Acc/F1 averaged first); a row lacking some tasks averages those it has and is marked ``*``. Missing
seeds are listed; of two runs with the same backbone, row, task and seed the newer metrics.json is kept.

Writes ``results.md``, ``results.csv`` (long format) and ``results.png`` into ``--out`` (default: the first
path). ``--compare A,B`` instead prints and writes (``compare.md``, ``compare.json``) a paired bootstrap of A - B
per task and seed from the runs' predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from flexlora.aggregate.collect import DEFAULT_ROWS, collect
from flexlora.aggregate.render import render_markdown, render_png, write_csv
from flexlora.aggregate.tables import summarise
from flexlora.errors import FlexLoRAError


def parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n")
    p = argparse.ArgumentParser(prog="flexlora-aggregate", description=doc[0] + "\n\n" + doc[1],
                                epilog="\n\n".join(doc[2:]).replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders (searched recursively) or metrics.json files")
    p.add_argument("--out", help="folder for results.md/.csv/.png or compare.md/.json (default: the first path)")
    p.add_argument("--metrics", choices=("final", "best"), default="final",
                   help="final weights (default) or the best evaluation of each run (tables only)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help="comma-separated config keys that make a row (default: allocator.name)")
    p.add_argument("--compare", metavar="A,B",
                   help="paired bootstrap of A - B instead of the tables; A and B are allocator names or --rows "
                        "values (v1:v2 in --rows order when one value is ambiguous), e.g. flexlora,adalora")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples per seed (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default: 0)")
    return p


def _out_dir(args: argparse.Namespace) -> Path:
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _compare(args: argparse.Namespace, runs: list, row_keys: tuple[str, ...]) -> int:
    from flexlora.aggregate.compare import compare, render_compare, report_json

    specs = [s.strip() for s in args.compare.split(",")]
    if len(specs) != 2 or not all(specs):
        print(f"error: --compare takes two names separated by a comma, got {args.compare!r}", file=sys.stderr)
        return 2
    report = compare(runs, specs[0], specs[1], row_keys, args.resamples, args.seed)
    markdown = render_compare(report)
    print(markdown)
    out = _out_dir(args)
    (out / "compare.md").write_text(f"# Comparison ({len(runs)} runs)\n\n{markdown}")
    (out / "compare.json").write_text(json.dumps(report_json(report), indent=2))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    row_keys = tuple(k.strip() for k in args.rows.split(",") if k.strip())
    skipped: list[str] = []
    which = "final" if args.compare else args.metrics  # predictions.jsonl holds the final model's predictions
    runs = collect(args.paths, row_keys, which, skipped)
    if not runs:
        where = " ".join(args.paths)
        print(f"error: no finished run (metrics.json with '{which}') under {where}", file=sys.stderr)
        return 1
    try:
        if args.compare:
            return _compare(args, runs, row_keys)
        tables = summarise(runs, row_keys)
    except FlexLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    markdown = render_markdown(tables)
    if skipped:
        markdown += "\nUnfinished or unreadable runs (skipped):\n\n" + "".join(f"- {s}\n" for s in skipped)
    print(markdown)
    out = _out_dir(args)
    (out / "results.md").write_text(f"# Results ({len(runs)} runs, {args.metrics} metrics)\n\n{markdown}")
    write_csv(tables, out / "results.csv", row_keys)
    written = [out / "results.md", out / "results.csv"]
    if render_png(tables, out / "results.png"):
        written.append(out / "results.png")
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
