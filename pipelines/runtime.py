"""The Ray runtime every stage shares: joining a cluster or starting a local one, and how loud the console is.

By default the console shows Ray's warnings and errors, the project's own one line per stage, one line per
training logging window, and Ray Data's progress bars; `--verbose` (or `set_verbose(True)`) restores Ray's full
INFO logging (operator plans, controller state changes, worker start-up).
"""

from __future__ import annotations

import logging
import os
import sys
import time

_state = {"verbose": False}


def set_verbose(verbose: bool) -> None:
    """Choose the console's loudness for this process (before `init_ray`)."""
    _state["verbose"] = bool(verbose)
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow"):
        logging.getLogger(name).setLevel(level)


def is_verbose() -> bool:
    return _state["verbose"]


def init_ray(address: str | None = None, local_cpus: int = 4) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local one.

    A local Ray gets at least `local_cpus` logical CPUs: Ray Data's read tasks ask for a whole CPU, and on a
    2-core host the train workers and preprocessing actors would otherwise leave none, hanging the job.
    Its dashboard (which Train V2's state API needs) binds 127.0.0.1.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = not is_verbose()
    set_verbose(not quiet)
    kwargs = {"log_to_driver": True}
    if quiet:
        # the level of Ray's own loggers in every worker and actor (Ray Data's operator plans, Train's
        # controller); prints of the project's workers (the training progress lines) still reach the driver
        kwargs["logging_level"] = logging.WARNING
        kwargs["logging_config"] = ray.LoggingConfig(log_level="WARNING")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus), dashboard_host="127.0.0.1", **kwargs)
    _quiet_ray_data(quiet)


def _quiet_ray_data(quiet: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    # the per-operator bars of a whole plan print one line per operator; one bar per dataset is enough
    ctx.enable_operator_progress_bars = not quiet
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = not quiet


def stage(message: str) -> None:
    """One console line for a stage of a job (flushed, on stderr, so stdout's last line stays the JSON result)."""
    print(f"[flowray {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
