"""Logging setup for the command line; library code only creates loggers."""

from __future__ import annotations

import logging
import sys


FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s"
DATE_FORMAT = "%H:%M:%S"


def configure_logging(verbosity: int) -> int:
    """Send ``batchrun`` log records to stderr and return the level chosen.

    :param verbosity: -1 for ``-q``, 0 by default, 1 for ``-v``, 2 or more for ``-vv``.
    """
    if verbosity < 0:
        level = logging.WARNING
    elif verbosity >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger = logging.getLogger("batchrun")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return level
