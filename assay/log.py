"""structlog setup: human-readable lines on stderr, filtered by level."""
from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# Whether libbpf's lines (logged at info and debug) can show at all; if not, libbpf is given no
# print callback, since each of its thousands of lines per load would cross into Python for nothing.
libbpf_visible = False


def configure(level: str = "warning") -> None:
    global libbpf_visible
    libbpf_visible = LEVELS.get(level, logging.WARNING) <= logging.INFO
    sync = getattr(sys.modules.get("assay.bpf"), "sync_libbpf_log", None)  # absent while it imports us
    if sync is not None:
        sync()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.WARNING)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


configure()
