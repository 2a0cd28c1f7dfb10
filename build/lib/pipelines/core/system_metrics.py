"""MLflow's system metrics (CPU, memory, GPU) of a stage's run, and a run that ends FINISHED, KILLED or FAILED as
its stage does (`monitored_run`)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from pipelines.core.errors import ConfigError, JobStopped
from pipelines.core.run_logger import SafeLogger


@contextmanager
def system_metrics(uri: str, run_id: str | None, enabled: bool = True, node_id: str | None = None):
    """MLflow system metrics of this node (CPU, memory, disk, network; GPUs where pynvml is installed) logged to the
    run every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10) while the block runs, continuing the run's own
    system steps after a restart. `node_id` names the node (`system/<node_id>/...`) where several log to one run."""
    monitor = None
    if enabled and run_id is not None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, resume_logging=True, node_id=node_id, tracking_uri=uri)
            monitor.start()
        except Exception as err:  # a convenience: the job goes on without it
            warnings.warn(
                f"MLflow system metrics not logged: {type(err).__name__}: {str(err)[:200]}",
                RuntimeWarning,
                stacklevel=3,
            )
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


@contextmanager
def monitored_run(uri: str, run_id: str | None, system: bool = True):
    """A batch stage's MLflow run while the stage runs: the system metrics of this node (the driver's; `system`),
    and its end when the stage does not finish: KILLED when stopped by a signal, FAILED on an error, and deleted
    when the input was refused before any work (a refused attempt leaves no run behind). None: nothing to do."""
    if run_id is None:
        yield
        return
    try:
        with system_metrics(uri, run_id, system):
            yield
    except ConfigError:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).delete_run(run_id)
        raise
    except JobStopped:
        SafeLogger(uri, run_id).finish("KILLED")
        raise
    except BaseException:
        SafeLogger(uri, run_id).finish("FAILED")
        raise
