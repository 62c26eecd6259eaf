"""``velox export``: flags of the log export; Beam's own pipeline options follow ``--``.

Registered as a ``velox.commands`` entry point (see :mod:`velox.cli`). Beam
is imported only when the command runs, so the rest of ``velox`` starts
without it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from velox.config import VeloxConfig
from velox.errors import ConfigError


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``velox export`` to the command line."""
    export = commands.add_parser(
        "export",
        help="export the observation log to the offline Parquet store (Apache Beam)",
        description="Export the durable observation log after the offline watermark to the "
        "offline store, exactly once. Beam pipeline options go after --, e.g. "
        "velox export --runner FlinkRunner -- --flink_master=host:8081",
    )
    export.add_argument(
        "--upto", type=int, metavar="SEQ", help="last sequence number (default: the durable head)"
    )
    export.add_argument(
        "--runner",
        default="DirectRunner",
        help="Beam runner: DirectRunner (default), FlinkRunner, SparkRunner, PortableRunner, ...",
    )
    export.add_argument(
        "--range-size",
        type=int,
        default=100_000,
        metavar="N",
        help="sequence numbers per pipeline element (default 100000)",
    )
    export.add_argument(
        "pipeline_args",
        nargs=argparse.REMAINDER,
        metavar="-- OPTION",
        help="Beam pipeline options, passed through after --",
    )
    export.set_defaults(handler=_export)


@contextmanager
def without_message(logger: logging.Logger, text: str) -> Iterator[None]:
    """Drop ``logger``'s records that contain ``text`` meanwhile.

    For Beam's warnings that tell a user of the export nothing: the Google
    Cloud clients it never uses, or options it rejects with an error of its own.
    """

    def quiet(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _export(args: argparse.Namespace, config: VeloxConfig) -> None:
    passed = args.pipeline_args[1:] if args.pipeline_args[:1] == ["--"] else args.pipeline_args
    if args.upto is not None and args.upto < 0:
        raise ConfigError(f"--upto must be a sequence number >= 0, got {args.upto}")
    with without_message(logging.getLogger(), "apitools not found"):  # Beam's, on import
        from batch_jobs.export import ExportJob
    ExportJob.from_config(
        config,
        upto=args.upto,
        pipeline_args=[f"--runner={args.runner}", *passed],
        range_size=args.range_size,
    ).run()
