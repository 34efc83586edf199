"""Hydra registration: the config schemas in the ConfigStore and the project's OmegaConf resolvers.

Called by ``run.py``, by ``compose`` below and by the Hydra plugin ``hydra_plugins/flexlora_schemas`` (so any
Hydra composition finds the schemas); never as an import side effect.
OmegaConf does not know ``typing.Literal``; each schema's Literal fields are registered as Enums built from
the same Literal, so a value outside it fails at composition ("Invalid value 'x', expected one of [...]")
while the library keeps plain strings (``to_plain`` turns the Enums back into strings).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from flexlora.allocators.config import load_methods
from flexlora.schemas import TASK_SCHEMAS, BackboneConfig
from flexlora.tasks import task_spec


def _hydra_type(hint: Any) -> Any:
    """Literal -> an Enum of its values (Optional kept); anything else unchanged."""
    optional = type(None) in get_args(hint)
    inner = [a for a in get_args(hint) if a is not type(None)] if optional else [hint]
    if len(inner) == 1 and get_origin(inner[0]) is Literal:
        values = [str(v) for v in get_args(inner[0])]
        choice = enum.Enum("Choice_" + "_".join(values), {v: v for v in values})  # type: ignore[misc]
        return choice | None if optional else choice
    return hint


@functools.cache
def hydra_schema(cls: type) -> type:
    """A copy of a config dataclass that OmegaConf can type-check: Literal fields become Enums; fields that
    are not constructor arguments (computed ones) are left out."""
    hints = get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default
        spec = dataclasses.field(default=default, metadata=f.metadata) if default is not dataclasses.MISSING else \
            dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)  # type: ignore[arg-type]
        fields.append((f.name, _hydra_type(hints[f.name]), spec))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _name(value: Any) -> str:
    return value.name if isinstance(value, enum.Enum) else str(value)


def _main_metric(task: Any, split: Any = "test") -> str:
    return task_spec(_name(task)).main_metric_for(_name(split))


def register() -> None:
    """Store the schemas (allocator/<name>_schema, backbone/schema, task/<family>_schema) and the resolvers."""
    store = ConfigStore.instance()
    for name, method in load_methods().items():
        store.store(group="allocator", name=f"{name}_schema", node=hydra_schema(method.config))
    store.store(group="backbone", name="schema", node=hydra_schema(BackboneConfig))
    for name, schema in TASK_SCHEMAS.items():
        store.store(group="task", name=name, node=hydra_schema(schema))
    resolvers = {"fl.main_metric": _main_metric, "fl.mul": lambda a, b: a * b}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (Enums as strings): what the library, metrics.json and loggers get."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(*overrides: str, output_dir: Path | None = None, conf_dir: Path = CONF_DIR) -> DictConfig:
    """The composed root config for ``overrides``, as run.py would get it (for tests, benchmarks, studies).

    ``output_dir`` replaces Hydra's run folder, and the Hydra node is dropped: outside a Hydra app there is no
    HydraConfig singleton (and Lightning's DDP launcher would take the run for a Hydra app if there were).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=output_dir is not None)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.pop("hydra")
            cfg.paths.output_dir = str(output_dir)
    return cfg
