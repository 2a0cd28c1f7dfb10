"""A training run's metrics in MLflow are the timeline that produced its checkpoints.

Rank 0 keeps each logging window until the next checkpoint and hands the windows over with that checkpoint's
report. Ray Train's controller, which outlives worker restarts, sends them to MLflow once it has registered the
checkpoint (`CheckpointedMetrics`). A restart resumes from the last registered checkpoint, so the windows redone
after it were never sent, and no step gets a second value. Should the controller itself die (the driver killed)
while windows wait in its queue, the next run sends the missing ones from Ray's record of the checkpoints
(`replay_windows`) before training resumes.
"""

from __future__ import annotations

import os

from ray.train import UserCallback

from pipelines.core.run_logger import SafeLogger

# the report key under which rank 0 hands its logging windows to the controller: (step, metrics, wall time in ms
# when the window closed), so that MLflow's time axis shows when each step was reached, not when its checkpoint was
# registered (a window of a checkpoint written before timestamps were recorded is (step, metrics))
WINDOWS = "_mlflow_windows"


def quick_http_failures() -> None:
    """The logger retries in the background, so MLflow's own retries (minutes per call) would only hold the queue
    back once the server is up again. For the process this runs in (a Train worker or controller); user settings
    win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class CheckpointedMetrics(UserCallback):
    """On the Ray Train controller: send the logging windows of each registered checkpoint to the MLflow run; at
    the last step, the run's final counters, then wait up to `flush_timeout_s` for what an outage queued. With
    `drain_s`, each checkpoint's windows are sent (or `drain_s` passes) before the callbacks after this one run: one
    of them may end the run (a sweep's scheduler stopping a trial), which would lose what is still queued."""

    def __init__(self, uri: str, run_id: str, steps: int, flush_timeout_s: float, drain_s: float = 0.0):
        self.uri, self.run_id, self.steps, self.flush_timeout_s = uri, run_id, steps, flush_timeout_s
        self.drain_s = drain_s
        self._logger: SafeLogger | None = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None or not metrics:
            return
        if self._logger is None:
            quick_http_failures()
            self._logger = SafeLogger(self.uri, self.run_id)
        for step, values, *when in metrics[0].get(WINDOWS, []):
            self._logger.metrics(values, step, *when)
        step = metrics[0].get("step")
        if self.drain_s and step != self.steps:
            self._logger.drain(self.drain_s)
        if step == self.steps:
            self._logger.metrics(
                {
                    "final_step": step,
                    "tracking_lost_points": self._logger.lost_points,
                    "tracking_failures": self._logger.failures,
                },
                step,
            )
            self._logger.close(self.flush_timeout_s)
            self._logger = None


def replay_windows(uri: str, run_id: str, previous, timeout: float = 60.0, after_step: int = 0) -> int:
    """Before a run resumes: send the windows of its registered checkpoints (`previous`, a `ray.train.Result`) that
    MLflow does not hold yet (those above the last step it has, and above `after_step`: a run that continues a
    finished one holds only its own). Returns how many windows are sent or already there."""
    windows = []
    for _, metrics in previous.best_checkpoints:
        windows += [
            (int(step), values, *when)
            for step, values, *when in (metrics or {}).get(WINDOWS, [])
            if int(step) > after_step
        ]
    if windows:
        logger = SafeLogger(uri, run_id)
        logger.replay(sorted(windows, key=lambda w: w[0]))
        logger.close(timeout)
    return len(windows)
