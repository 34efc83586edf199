"""Entry point: compose the Hydra config, train, return the optimised metric (for sweepers)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from flexlora.errors import FlexLoRAError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from flexlora.train import train  # heavy imports after Hydra has parsed the command line

    try:
        return train(cfg)
    except FlexLoRAError as err:
        logging.getLogger("flexlora").error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
