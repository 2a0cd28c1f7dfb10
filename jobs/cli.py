"""What every job's command line shares: `--set`, `--verbose`, the tracking URI, and one way to end on bad input
(the message on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_common(p: argparse.ArgumentParser, tracking: bool = True, overrides: bool = True) -> None:
    if overrides:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show Ray's full INFO logging")
    if tracking:
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
        p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")


def tracking_and_checkpoint(args: argparse.Namespace) -> tuple[str, str]:
    """The tracking URI of a batch job (checked to answer, before any Ray work, when it will be used) and its
    checkpoint directory (a path, runs:/ID or models:/NAME/VERSION|@ALIAS resolved through MLflow)."""
    from pipelines.config import tracking_uri
    from pipelines.tracking import check_tracking_uri, resolve_checkpoint

    uri = args.tracking_uri or tracking_uri()
    if not args.no_mlflow or args.checkpoint.startswith(("runs:/", "models:/")):
        check_tracking_uri(uri, "--tracking-uri")
    return uri, resolve_checkpoint(args.checkpoint, uri)


def run_job(name: str, args: argparse.Namespace, body: Callable[[], Any]) -> Any:
    """Run a job's body; a `ConfigError` (every input error derives from it) ends it with status 2."""
    from pipelines.config import ConfigError
    from pipelines.runtime import set_verbose

    set_verbose(getattr(args, "verbose", False))
    try:
        return body()
    except ConfigError as err:
        print(f"{name} failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
