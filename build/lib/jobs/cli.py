"""What every job's command line shares: `--set`, `--verbose`, the tracking URI, and one way to end on bad input
(the message on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable
from typing import Any


def add_common(p: argparse.ArgumentParser, tracking: bool = True, overrides: bool = True) -> None:
    if overrides:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--verbose", action="store_true", help="show Ray's full INFO logging")
    if tracking:
        p.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)",
        )
        p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
        p.add_argument(
            "--no-system-metrics",
            action="store_true",
            help="no MLflow system metrics (CPU, memory, disk, network, GPU) in the job's run",
        )


def key_list(section: str, config: Any) -> str:
    """The `--set` keys of one config section, from its dataclass (so that the list never drifts from the code):
    "Keys (SECTION.*, default in brackets): name [default], ...", for a job's --help."""
    import dataclasses
    import textwrap

    keys = ", ".join(f"{f.name} [{getattr(config, f.name)!r}]" for f in dataclasses.fields(config))
    return textwrap.fill(f"Keys ({section}.*, default in brackets): {keys}", 118)


def int_list(text: str) -> list[int]:
    """An argparse `type`: "0,1,2" -> [0, 1, 2]. An empty list, an empty item or a non-integer is a usage error
    (exit status 2, before any work), as every other bad flag is."""
    return _number_list(text, int, "integers")


def float_list(text: str) -> list[float]:
    """An argparse `type`: "0.05,0.1" -> [0.05, 0.1], checked as `int_list` is (finite numbers only)."""
    values = _number_list(text, float, "numbers")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not a finite number")
    return values


def _number_list(text: str, kind: type, what: str) -> list:
    items = [t.strip() for t in str(text).split(",")]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"an empty list; give at least one of the {what}")
    return values


def name_list(text: str) -> list[str]:
    """An argparse `type`: "a,b" -> ["a", "b"]; an empty list or an empty item is a usage error."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; expected comma-separated names")
    return items


def tracking_and_checkpoint(args: argparse.Namespace) -> tuple[str, str]:
    """The tracking URI of a batch job (checked to answer, before any Ray work, when it will be used) and its
    checkpoint directory (a path, runs:/ID or models:/NAME/VERSION|@ALIAS resolved through MLflow)."""
    from pipelines.core.registry import resolve_checkpoint
    from pipelines.core.tracking import check_tracking_uri, tracking_uri

    uri = args.tracking_uri or tracking_uri()
    if not args.no_mlflow or args.checkpoint.startswith(("runs:/", "models:/")):
        check_tracking_uri(uri, "--tracking-uri")
    return uri, resolve_checkpoint(args.checkpoint, uri)


def run_job(name: str, args: argparse.Namespace, body: Callable[[], Any]) -> Any:
    """Run a job's body; a `ConfigError` (every input error derives from it) ends it with status 2, SIGINT or
    SIGTERM with one line saying what was kept, Ray stopped, and status 130 or 143."""
    from pipelines.core.errors import ConfigError, JobFailed, JobStopped
    from pipelines.core.runtime import default_signals, filter_console_noise, set_verbose, stop_on_signals

    set_verbose(getattr(args, "verbose", False))
    filter_console_noise()  # Ray's known non-errors (console.KNOWN_NOISE); a job run in process keeps its stderr
    stop_on_signals()
    try:
        return body()
    except ConfigError as err:
        print(f"{name} failed: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except JobFailed as err:  # not the input: a failure the job explains in one line
        _stop_ray()
        print(f"{name} failed: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except JobStopped as stop:
        _stop_ray()
        kept = f"; {stop.kept}" if stop.kept else ""
        print(
            f"{name} stopped by {signal.Signals(stop.signum).name}{kept}; rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(stop.exit_status) from None
    finally:
        default_signals()  # a job run in process (a test, a notebook) leaves the signals as Python has them


def _stop_ray() -> None:
    """Disconnect from Ray (a local Ray stops: its processes end with it; on a cluster the job's actors do)."""
    ray = sys.modules.get("ray")  # never imported: nothing to stop
    if ray is None or not ray.is_initialized():
        return
    # the stage's thread (a Ray Data iterator, Train's fit) outlives this by a moment: it must not start a new local
    # Ray on its next call (Ray's auto-init), and its complaints about the Ray that went away are not news
    hook = sys.modules.get("ray._private.auto_init_hook")
    if hook is not None:
        setattr(hook, "enable_auto_connect", False)  # noqa: B010  (a module attribute the stubs do not declare)
    logging.disable(logging.CRITICAL)
    ray.shutdown()
