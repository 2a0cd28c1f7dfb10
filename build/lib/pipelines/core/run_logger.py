"""A logger that sends to MLflow in the background (`SafeLogger`), so that a tracking outage neither crashes nor
stalls a job: records are queued, retried while the server is away, and flushed or counted at the end."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class _Record:
    """One queued call: `send(client)` does it; `points` metric values it carries (for counting losses)."""

    what: str
    send: Callable
    points: int = 0
    spool: Path | None = None  # a copy of an artifact, removed once sent or dropped


def _transient(err: Exception) -> bool:
    """Worth retrying: no answer, a timeout, a 5xx or a locked database. A request MLflow refuses (4xx) is not."""
    from mlflow.exceptions import MlflowException

    return not isinstance(err, MlflowException) or err.get_http_status_code() >= 500


def now_ms() -> int:
    """Wall-clock time in ms, as MLflow stamps a metric."""
    return int(time.time() * 1000)


class SafeLogger:
    """Logs to one MLflow run from a background thread: a tracking outage never holds the caller back.

    Every call queues a record and returns at once; metrics keep the time of the call. One thread sends the
    records in order. A send that fails transiently (server gone, timeout, 5xx) is retried with backoff from
    1 s to 10 s until it succeeds, so what was queued during an outage is sent when the server returns; a request
    MLflow refuses is dropped and counted in `failures`. When `max_queue` records wait, the oldest metrics record
    is dropped and its values are counted in `lost_points`. `close()` (and `finish()`) waits up to `timeout`
    seconds for the queue, then counts what is left as lost and says so in a warning.
    """

    def __init__(self, uri: str, run_id: str, max_queue: int = 10_000):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.max_queue = MlflowClient(uri), run_id, max_queue
        self.failures = self.lost_points = self.retries = 0
        self._queue: deque[_Record] = deque()
        self._cond = threading.Condition()
        self._busy = False  # the thread holds a record that is not yet sent
        self._closed = self._overflowed = False
        self._spool: Path | None = None
        self._thread = threading.Thread(target=self._run, name="flowray-mlflow-logger", daemon=True)
        self._thread.start()

    # --- what callers queue -----------------------------------------------------------------------------------

    def metrics(self, values: dict[str, float], step: int, timestamp_ms: int | None = None) -> bool:
        """Queue `values` at `step`, stamped `timestamp_ms` (when they were measured; default now)."""
        from mlflow.entities import Metric

        ts = int(timestamp_ms) if timestamp_ms is not None else now_ms()
        batch = [Metric(k, float(v), ts, step) for k, v in values.items()]
        return self._put(_Record("log metrics", lambda c: c.log_batch(self.run_id, metrics=batch), len(batch)))

    def replay(self, entries: list[tuple], key: str = "loss") -> bool:
        """Queue (step, metrics[, timestamp in ms]) entries that an earlier attempt may have sent already: when the
        record's turn comes, only those above the last step MLflow holds for `key` are sent, so no step is logged
        twice."""
        from mlflow.entities import Metric

        def send(client) -> None:
            history = client.get_metric_history(self.run_id, key)
            last = max((m.step for m in history), default=-1)
            batch = [
                Metric(k, float(v), ts, step) for step, values, ts in stamped if step > last for k, v in values.items()
            ]
            if batch:
                client.log_batch(self.run_id, metrics=batch)

        now = now_ms()
        stamped = [(step, values, int(when[0]) if when else now) for step, values, *when in entries]
        return self._put(_Record("replay metrics", send, sum(len(e[1]) for e in entries)))

    def params(self, values: dict) -> bool:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in values.items()]
        ok = True
        for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per request
            part = batch[i : i + 100]
            ok &= self._put(_Record("log params", lambda c, part=part: c.log_batch(self.run_id, params=part)))
        return ok

    def tags(self, values: dict[str, str]) -> bool:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in values.items()]
        return self._put(_Record("set tags", lambda c: c.log_batch(self.run_id, tags=batch)))

    def inputs(self, datasets: list) -> bool:
        """Queue MLflow dataset inputs (`mlflow.entities.DatasetInput`s from `dataset_input`): the run's lineage."""
        return self._put(_Record("log inputs", lambda c: c.log_inputs(self.run_id, datasets=list(datasets))))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Queue a file or folder; it is copied first, so the caller may delete it at once."""
        src = Path(path)
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="flowray-mlflow-spool-"))
        copy = Path(tempfile.mkdtemp(dir=self._spool)) / src.name
        shutil.copytree(src, copy) if src.is_dir() else shutil.copy2(src, copy)
        fn = "log_artifacts" if src.is_dir() else "log_artifact"
        return self._put(
            _Record(
                f"log artifact {src.name}",
                lambda c: getattr(c, fn)(self.run_id, str(copy), artifact_path),
                spool=copy.parent,
            )
        )

    def finish(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Queue the end of the run, then `close`. True when everything queued was sent."""
        self._put(_Record("end run", lambda c: c.set_terminated(self.run_id, status)))
        return self.close(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for what is queued now to be sent, and go on logging; True when it was."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._queue or self._busy), timeout)

    def close(self, timeout: float = 60.0) -> bool:
        """Wait up to `timeout` s for the queue to be sent; what is left is counted as lost. True if none was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.wait_for(lambda: not (self._queue or self._busy), max(0.0, deadline - time.monotonic()))
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            # a record waiting out its backoff is dropped by the thread as soon as it sees the logger closed
            in_flight = not self._cond.wait_for(lambda: not self._busy, 5.0)
        for record in left:
            self._drop(record)
        if left or in_flight or self.lost_points:
            warnings.warn(
                f"MLflow: {self.lost_points} metric value(s) were not logged to run {self.run_id} "
                f"({len(left) + in_flight} record(s) still queued when closed after {timeout:.0f} s, "
                f"{self.failures} refused)",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._spool is not None and not in_flight:
            shutil.rmtree(self._spool, ignore_errors=True)
        return not left and not in_flight and self.failures == 0 and self.lost_points == 0

    # --- the sending thread -----------------------------------------------------------------------------------

    def _put(self, record: _Record) -> bool:
        with self._cond:
            if self._closed:
                self._drop(record)
                return False
            if len(self._queue) >= self.max_queue:
                oldest = next((r for r in self._queue if r.points), self._queue[0])
                self._queue.remove(oldest)
                self._drop(oldest)
                if not self._overflowed:  # said once; every loss is counted
                    self._overflowed = True
                    warnings.warn(
                        f"MLflow logging queue full ({self.max_queue} records): dropping the oldest "
                        "metrics while the tracking server does not answer",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            self._queue.append(record)
            self._cond.notify_all()
        return True

    def _drop(self, record: _Record) -> None:
        with self._cond:
            self.lost_points += record.points
        if record.spool is not None:
            shutil.rmtree(record.spool, ignore_errors=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                record = self._queue.popleft()
                self._busy = True
            self._send(record)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _send(self, record: _Record) -> None:
        delay = 1.0
        while True:
            try:
                record.send(self.client)
                if record.spool is not None:
                    shutil.rmtree(record.spool, ignore_errors=True)
                return
            except Exception as err:  # tracking must never kill training
                if not _transient(err):
                    self.failures += 1
                    self._drop(record)
                    warnings.warn(
                        f"MLflow {record.what} refused, dropped ({self.failures} so far): "
                        f"{type(err).__name__}: {str(err)[:200]}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return
                self.retries += 1
                if self.retries in (1, 10) or self.retries % 100 == 0:
                    warnings.warn(
                        f"MLflow {record.what} failed ({self.retries} retries so far); queued, retrying "
                        f"in the background, training continues: {type(err).__name__}: "
                        f"{str(err)[:200]}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            with self._cond:  # wait out the backoff unless the logger is closed meanwhile
                if self._cond.wait_for(lambda: self._closed, timeout=delay):
                    self._drop(record)
                    return
            delay = min(2 * delay, 10.0)
