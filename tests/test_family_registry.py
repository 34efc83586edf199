"""Every registered task family resolves to its Family class, its task schema, its table rule and (where it has
them) its comparison rule and preprocessor; every task belongs to a registered family; a run of an unregistered
family is reported."""

from __future__ import annotations

from flexlora.aggregate.collect import Run
from flexlora.aggregate.tables import summarise
from flexlora.families import Family, family_class
from flexlora.family_registry import FAMILIES
from flexlora.tasks import TASKS


def test_every_registered_family_resolves():
    assert set(FAMILIES) == {"classification", "causal_lm", "image", "synthetic"}
    for name, entry in FAMILIES.items():
        assert issubclass(family_class(name), Family)
        assert callable(entry.resolve(entry.tables)), f"{name} has no table rule"
        assert entry.preprocessor is None or callable(entry.resolve(entry.preprocessor))
        assert entry.resolve(entry.tables)([], ("allocator.name",)) == []
        assert entry.compare_units is None or callable(entry.resolve(entry.compare_units)), f"{name}: compare rule"
        from flexlora.schemas import TASK_SCHEMAS

        assert entry.task_schema in TASK_SCHEMAS, f"{name} names no task schema"
        import transformers

        assert hasattr(transformers, entry.auto_class), f"{name}: {entry.auto_class} is not a transformers class"


def test_every_task_belongs_to_a_registered_family():
    assert {spec.family for spec in TASKS.values()} <= set(FAMILIES)


def test_runs_of_a_family_without_a_table_rule_are_reported_not_dropped(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(FAMILIES, "synthetic")
    run = Run(path=tmp_path / "metrics.json", backbone="synthetic", row=("lora",), task="rank_recovery", seed=1,
              final={"val/mse": 1.0})
    summarise([run])
    assert "task family 'synthetic' have no table rule" in capsys.readouterr().err
