"""Hydra plugin: makes flexlora's config schemas and resolvers available to every Hydra composition.

Hydra discovers plugins under the ``hydra_plugins`` namespace package and calls each SearchPathPlugin before it
loads a config. Registering here means ``initialize_config_dir(...); compose("config", ...)`` works from a
notebook or another tool without calling ``flexlora.conf_store.register()`` first (``conf/allocator/*.yaml``
and ``conf/task/*.yaml`` extend the ``*_schema`` nodes that only the ConfigStore holds).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FlexLoRASchemas(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from flexlora.conf_store import register

        register()
