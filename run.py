"""Entry point: compose the Hydra config, train, return the optimised metric (for sweepers)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flexlora.conf_store import register
from flexlora.errors import FlexLoRAError

register()  # schemas in Hydra's ConfigStore and the project's resolvers, before @hydra.main composes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers fork-warn under DataLoader workers


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from flexlora.train import train  # heavy imports after Hydra has parsed the command line

    try:
        return train(cfg)
    except FlexLoRAError as err:
        # one clear line, no traceback; the run folder is marked failed, never left looking finished
        logging.getLogger("flexlora").error("%s", err)
        (Path(cfg.paths.output_dir) / "error.txt").write_text(f"{err}\n")
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
