"""Entry point: ``python -m worker --input ... --output ... --model ...`` (see --help).

A bad input (a flag, a path, an input without images, a model the worker can't run) ends the
process with one line on stderr and exit code 2, before torch is imported or any model fetched
(the model's two config files aside); a PyTorchJob's ExitCode policy does not retry it.
"""

from __future__ import annotations

import logging
import os
import sys

from worker.checks import check_locations
from worker.config import PROG, ConfigError, parse_args

BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        cfg = parse_args(argv)
        check_locations(cfg)
        from worker.run import run  # heavy imports (torch, transformers) only once the input checks out

        run(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
