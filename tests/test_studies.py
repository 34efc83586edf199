"""The study queue and score record: a checkout without run folders must make the same choices, and two workers
must never run one job twice."""

from __future__ import annotations

import json
from pathlib import Path

from flexlora.studies import Job, ScoreRecord, best_of, run_next, widen


def _finish(job: Job, value: float) -> None:
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "metrics.json").write_text(json.dumps({"final": {"tune/acc": value}}))


def test_record_falls_back_for_missing_runs_and_prefers_a_run_that_exists(tmp_path: Path) -> None:
    root, path = tmp_path / "runs", tmp_path / "tune_record.json"
    a, b, c = (Job(root / "tune" / f"lr{lr:g}", ()) for lr in (1e-3, 2e-3, 4e-3))
    _finish(a, 0.5)
    _finish(b, 0.75)
    ScoreRecord(path, root).update([a, b, c], "tune/acc")
    assert json.loads(path.read_text()) == {"tune/lr0.001": 0.5, "tune/lr0.002": 0.75}

    (a.out / "metrics.json").unlink()  # a fresh checkout: the run folder is gone, the record is not
    (b.out / "metrics.json").write_text(json.dumps({"final": {"tune/acc": 0.25}}))  # rerun here: the run wins
    fresh = ScoreRecord(path, root)
    assert fresh.score(a, "tune/acc") == 0.5
    assert fresh.score(b, "tune/acc") == 0.25
    assert fresh.score(c, "tune/acc") is None


def test_nan_score_never_wins_and_an_edge_choice_widens_once(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    jobs = {lr: Job(root / f"lr{lr:g}", ()) for lr in (1e-3, 2e-3, 4e-3)}
    for lr, value in zip(jobs, (0.1, 0.2, float("nan")), strict=True):
        _finish(jobs[lr], value)
    record = ScoreRecord(tmp_path / "r.json", root)
    choice = best_of({lr: record.score(job, "tune/acc") for lr, job in jobs.items()})
    assert (choice.value, choice.at_edge) == (2e-3, False)
    edge = best_of({1e-3: 0.1, 2e-3: 0.2, 4e-3: 0.3})
    assert widen([1e-3, 2e-3, 4e-3], edge) == [1e-3, 2e-3, 4e-3, 8e-3]


def test_run_next_claims_each_job_once_across_workers(tmp_path: Path, monkeypatch) -> None:
    import flexlora.studies as studies

    jobs = [Job(tmp_path / name, ()) for name in ("a", "b")]
    ran: list[str] = []
    monkeypatch.setattr(studies, "_train", lambda job, base, train: (ran.append(job.out.name), _finish(job, 1.0)))
    assert run_next(jobs, ())
    assert ran == ["a"]
    jobs[1].out.mkdir()
    (jobs[1].out / ".claim").touch()  # another worker holds b
    assert not run_next(jobs, ())  # a is done, b is claimed: nothing left for this worker
    assert ran == ["a"]


def test_settle_asks_for_the_centre_first_widens_at_an_edge_and_stops_at_the_limit() -> None:
    from flexlora.studies import settle

    scores: dict[float, float] = {}
    first = settle((4e-3, 2e-3, 8e-3), scores.get, max_widen=1)
    assert first.choice is None and first.missing == [4e-3, 2e-3, 8e-3]  # centre first, as the grid lists it

    scores.update({2e-3: 0.1, 4e-3: 0.2, 8e-3: 0.3})  # best at the top edge: one more value is needed
    assert settle((4e-3, 2e-3, 8e-3), scores.get, max_widen=1).missing == [1.6e-2]
    scores[1.6e-2] = 0.4  # the edge again, but the grid may not widen twice
    limited = settle((4e-3, 2e-3, 8e-3), scores.get, max_widen=1)
    assert (limited.choice.value, limited.choice.at_edge, limited.missing) == (1.6e-2, True, [])
    scores[1.6e-2] = 0.25  # interior: 8e-3 wins
    interior = settle((4e-3, 2e-3, 8e-3), scores.get, max_widen=1)
    assert (interior.choice.value, interior.choice.at_edge, interior.grid) == (8e-3, False, [2e-3, 4e-3, 8e-3, 1.6e-2])


def _finish_checked(job: Job, value: float, check: str | None) -> None:
    job.out.mkdir(parents=True, exist_ok=True)
    metrics = {"final": {"tune/acc": value}, **({"degenerate_check": check} if check else {})}
    (job.out / "metrics.json").write_text(json.dumps(metrics))


def test_a_record_with_a_check_counts_only_scores_taken_under_it(tmp_path: Path) -> None:
    root, path = tmp_path / "runs", tmp_path / "tune_record.json"
    old, older_run, new = (Job(root / f"lr{lr:g}", ()) for lr in (1e-3, 2e-3, 4e-3))
    path.write_text(json.dumps({"lr0.001": 0.5}))  # a record written before the rule had a name
    _finish_checked(older_run, 0.6, "whole-split")
    _finish_checked(new, 0.4, "per-format")
    lax = ScoreRecord(path, root)  # no check: every score counts, as before
    assert [lax.score(j, "tune/acc") for j in (old, older_run, new)] == [0.5, 0.6, 0.4]
    strict = ScoreRecord(path, root, check="per-format")
    assert [strict.score(j, "tune/acc") for j in (old, older_run, new)] == [None, None, 0.4]
    assert [strict.bound(j, "tune/acc") for j in (old, older_run, new)] == [0.5, 0.6, 0.4]
    strict.update([older_run, new], "tune/acc")
    assert json.loads(path.read_text()) == {
        "lr0.001": 0.5, "lr0.002": {"score": 0.6, "degenerate": "", "check": "whole-split"},
        "lr0.004": {"score": 0.4, "degenerate": "", "check": "per-format"}}
    for job in (older_run, new):
        (job.out / "metrics.json").unlink()  # a fresh checkout keeps each entry's rule
    again = ScoreRecord(path, root, check="per-format")
    assert [again.score(j, "tune/acc") for j in (old, older_run, new)] == [None, None, 0.4]


def test_settle_reruns_only_a_best_that_rests_on_a_bound() -> None:
    from flexlora.studies import settle

    bounds = {2e-3: 0.43, 4e-3: 0.445, 8e-3: 0.467, 1.6e-2: 0.47, 3.2e-2: 0.475}  # older check: upper bounds
    scores: dict[float, float] = {}
    grid = (4e-3, 2e-3, 8e-3)
    step = settle(grid, scores.get, 3, bounds.get)
    assert step.choice is None and step.missing == [8e-3]  # the best of the bounds, at the edge, is rechecked
    scores[8e-3] = 0.467  # holds under the new check: the grid widens, and the new edge rests on a bound
    assert settle(grid, scores.get, 3, bounds.get).missing == [1.6e-2]
    scores[1.6e-2] = 0.47  # holds: the next widening's bound leads
    assert settle(grid, scores.get, 3, bounds.get).missing == [3.2e-2]
    scores[3.2e-2] = float("-inf")  # collapsed under the new check: 1.6e-2 is the interior choice
    done_ = settle(grid, scores.get, 3, bounds.get)
    assert (done_.choice.value, done_.choice.at_edge, done_.missing) == (1.6e-2, False, [])
    assert done_.grid == [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]  # 2e-3 and 4e-3 never reran: they cannot win


def test_an_all_degenerate_grid_widens_downwards_and_then_has_no_choice() -> None:
    from flexlora.studies import settle

    scores = dict.fromkeys((5e-4, 1e-3, 2e-3), float("-inf"))
    assert settle((1e-3, 5e-4, 2e-3), scores.get, 1).missing == [2.5e-4]  # away from the collapse
    scores[2.5e-4] = float("-inf")
    none = settle((1e-3, 5e-4, 2e-3), scores.get, 1)
    assert (none.choice, none.missing, none.grid) == (None, [], [2.5e-4, 5e-4, 1e-3, 2e-3])
    scores[2.5e-4] = 0.3  # one admissible value is enough
    assert settle((1e-3, 5e-4, 2e-3), scores.get, 1).choice.value == 2.5e-4


def test_a_checked_record_keeps_a_degenerate_runs_measured_value_and_reason(tmp_path: Path) -> None:
    root, path = tmp_path / "runs", tmp_path / "tune_record.json"
    job = Job(root / "lr1e-3", ())
    job.out.mkdir(parents=True)
    (job.out / "metrics.json").write_text(json.dumps({
        "final": {"tune/acc": 0.47}, "degenerate": {"tune": True}, "degenerate_check": "per-format",
        "degenerate_reason": {"tune": "true/false items: every example predicted class true"}}))
    ScoreRecord(path, root, check="per-format").update([job], "tune/acc")
    (job.out / "metrics.json").unlink()
    found = ScoreRecord(path, root, check="per-format").lookup(job, "tune/acc")
    assert (found.value, found.degenerate) == (0.47, "true/false items: every example predicted class true")
    assert ScoreRecord(path, root, check="per-format").score(job, "tune/acc") == float("-inf")
