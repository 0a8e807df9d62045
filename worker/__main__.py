"""Entry point: ``python -m worker --input ... --output ... --model ...`` (see --help)."""

from __future__ import annotations

import logging
import os
import sys

from worker.config import parse_args


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    cfg = parse_args(argv)
    from worker.run import run  # heavy imports (torch, transformers) only after --help

    try:
        run(cfg)
    except FileNotFoundError as exc:
        logging.getLogger("worker").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
