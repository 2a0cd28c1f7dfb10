"""MLflow helpers: experiments with an absolute artifact location, runs found again by name, and a logger that
sends in the background, so that a tracking outage neither crashes nor stalls a job."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipelines.core import storage
from pipelines.core.checkpoint import META, CheckpointError, load_model
from pipelines.core.errors import ConfigError, JobStopped

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("outputs") / "mlflow.db"  # artifacts beside it in outputs/mlartifacts (never the source tree)


def tracking_uri(configured: str | None = None) -> str:
    """The MLflow tracking URI: the configured one (`mlflow.tracking_uri`), else $MLFLOW_TRACKING_URI, else sqlite at
    outputs/mlflow.db (created). A relative sqlite path is made absolute here, on the driver: Ray Train runs its
    workers in another folder (the Ray session's artifacts/<run name>/), where it would name another store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        path = uri.removeprefix("sqlite:///")
        if uri.startswith("sqlite:///") and not path.startswith(("/", ":memory:")):
            return f"sqlite:///{(Path.cwd() / path).resolve()}"
        return uri
    store = (Path.cwd() / DEFAULT_STORE).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def ui_link(uri: str, run_id: str) -> str:
    """Where MLflow's UI shows a run: on the tracking server for an HTTP URI, else on `mlflow ui` at its default
    address over the same store. The query selects the model-training view: MLflow 3's UI takes the view from the
    link's `workflowType`, else from the browser's last choice (GenAI at first), whatever the experiment's kind."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def ui_hint(uri: str, run_id: str) -> str:
    """One console line saying where to see a run in MLflow's UI (with the command that serves a local store)."""
    link = ui_link(uri, run_id)
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {link}"
    return f"MLflow: {link} (after `mlflow ui --backend-store-uri {uri}`)"


def artifact_root(uri: str) -> str | None:
    """Absolute artifact location for file-backed stores; None (server default) for HTTP tracking.

    With sqlite, MLflow would put artifacts in ./mlruns relative to each process's working directory, and Ray
    workers run in Ray's session folder, so the driver fixes an absolute location next to the database.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    if parsed.scheme in ("", "file"):
        return (Path(parsed.path or uri).resolve() / "artifacts").as_uri()
    return None


# the tracking stores MLflow itself opens (a database URI may name its driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri", timeout: float = 5.0) -> None:
    """Fail fast, before any Ray work, on a tracking URI MLflow cannot use: a scheme it has no store for, a sqlite
    database in a folder that does not exist, an HTTP server that does not answer (instead of MLflow's minutes of
    retries) or answers with an error. Raises ConfigError naming the key and the URI."""
    import urllib.error
    import urllib.request

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme and len(scheme) > 1 and scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{key}: {uri!r} has the scheme {parsed.scheme!r}, which MLflow has no tracking store "
                          f"for; allowed: {', '.join(TRACKING_SCHEMES)} (or a local folder)")
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is None or not db.name:
            raise ConfigError(f"{key}: {uri!r} is not a sqlite database URI; write sqlite:///path/to/mlflow.db")
        if not db.parent.is_dir():
            raise ConfigError(f"{key}: the folder of the sqlite database {db} does not exist; create it, or point "
                              "the key (or $MLFLOW_TRACKING_URI) elsewhere")
        if db.is_dir():
            raise ConfigError(f"{key}: {db} is a folder, not a sqlite database file; write sqlite:///path/to/mlflow.db")
        if db.is_file() and db.stat().st_size:  # an empty file becomes a new database; anything else must be one
            with open(db, "rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise ConfigError(f"{key}: {db} is not a sqlite database (its first bytes are {head[:12]!r}); point "
                                  "the key (or $MLFLOW_TRACKING_URI) at an MLflow database or a new file")
    if scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except urllib.error.HTTPError as err:  # something answers, but not as an MLflow server does
        raise ConfigError(f"{key}: the server at {uri} answers HTTP {err.code} ({err.reason}) to /health; is it "
                          "an MLflow tracking server (`mlflow server`)?") from None
    except Exception as err:  # URLError, timeouts: the server is not usable
        reason = getattr(err, "reason", err)
        raise ConfigError(f"{key}: the MLflow server at {uri} does not answer ({reason}); start it, or point "
                          "the key (or $MLFLOW_TRACKING_URI) elsewhere") from None


# MLflow 3's UI opens an experiment in the view its kind tag names; without it, an experiment whose runs it cannot
# classify opens in the GenAI view (traces, sessions, judges). Ours are model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """Experiment id by name, creating it with an absolute artifact location and the model-training kind when
    missing (an existing one without a kind gets it; a kind someone chose is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if "mlflow.experimentKind" not in (exp.tags or {}):
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    root = artifact_root(uri)
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                    tags=EXPERIMENT_KIND)


PROJECT_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _who_and_which_commit() -> dict[str, str]:
    """The user and the project's git commit (when it is a git checkout): the same for every run of a process."""
    import getpass
    import subprocess

    tags = {}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        pass
    if (PROJECT_ROOT / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()
            if len(commit) == 40:
                tags["mlflow.source.git.commit"] = commit
        except (OSError, subprocess.SubprocessError):
            pass
    return tags


def source_tags(description: str | None = None) -> dict[str, str]:
    """What MLflow's run page shows as the run's source: the command that ran it, the user, the project's git commit
    (when the project is a git checkout) and a one-line description."""
    import sys

    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    entry = f"python -m jobs.{argv0.stem}" if argv0.resolve().parent == PROJECT_ROOT / "jobs" else argv0.name
    tags = {"mlflow.source.name": entry, "mlflow.source.type": "LOCAL", **_who_and_which_commit()}
    if description:
        tags["mlflow.note.content"] = description
    return tags


def find_run(uri: str, experiment: str, run_name: str, storage: str):
    """The newest MLflow run of `run_name` whose Ray Train state lies at `storage` (an `mlflow.entities.Run`), or
    None. Nothing is changed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`flowray.run_name` = '{run_name}' and "
                               f"tags.`flowray.storage` = '{storage}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None) -> str:
    """A new run tagged with `run_name` (and `tags`); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    all_tags = {**source_tags(), "flowray.run_name": run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id


def find_or_create_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                       resume: bool = True, parent_run_id: str | None = None) -> tuple[str, bool]:
    """The id of the run tagged with run_name (and the same `flowray.storage` tag) in the experiment, set RUNNING
    again (resume=True), or of a new one. Returns (run_id, resumed)."""
    from mlflow.tracking import MlflowClient

    if resume:
        found = find_run(uri, experiment, run_name, (tags or {}).get("flowray.storage", ""))
        if found:
            MlflowClient(uri).update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id, True
    return create_run(uri, experiment, run_name, tags, parent_run_id), False


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
            batch = [Metric(k, float(v), ts, step) for step, values, ts in stamped if step > last
                     for k, v in values.items()]
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
        return self._put(_Record(f"log artifact {src.name}",
                                 lambda c: getattr(c, fn)(self.run_id, str(copy), artifact_path), spool=copy.parent))

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
            warnings.warn(f"MLflow: {self.lost_points} metric value(s) were not logged to run {self.run_id} "
                          f"({len(left) + in_flight} record(s) still queued when closed after {timeout:.0f} s, "
                          f"{self.failures} refused)", RuntimeWarning, stacklevel=2)
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
                    warnings.warn(f"MLflow logging queue full ({self.max_queue} records): dropping the oldest "
                                  "metrics while the tracking server does not answer", RuntimeWarning, stacklevel=3)
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
                    warnings.warn(f"MLflow {record.what} refused, dropped ({self.failures} so far): "
                                  f"{type(err).__name__}: {str(err)[:200]}", RuntimeWarning, stacklevel=2)
                    return
                self.retries += 1
                if self.retries in (1, 10) or self.retries % 100 == 0:
                    warnings.warn(f"MLflow {record.what} failed ({self.retries} retries so far); queued, retrying "
                                  f"in the background, training continues: {type(err).__name__}: "
                                  f"{str(err)[:200]}", RuntimeWarning, stacklevel=2)
            with self._cond:  # wait out the backoff unless the logger is closed meanwhile
                if self._cond.wait_for(lambda: self._closed, timeout=delay):
                    self._drop(record)
                    return
            delay = min(2 * delay, 10.0)


def log_final_model(uri: str, run_id: str, checkpoint: str, register_as: str | None = None,
                    data: dict | None = None) -> dict:
    """Log the final checkpoint to the training run, and the EMA network as an MLflow Model.

    The run gets the checkpoint directory as artifact `model` (without the optimizer state), which `runs:/RUN_ID`
    resolves to. The MLflow Model (`mlflow.pytorch`, `name="mlflow_model"`) is the network exported with
    torch.export (MLflow's pt2 format, no pickled code), with a tensor signature (x_t, t[, y]) -> prediction, and
    the checkpoint files as its extra files, so `models:/NAME/VERSION` rebuilds it with `weights_only=True`. With
    `register_as`, the model is registered under that name. Tracking errors warn and return what was done.
    """

    out: dict = {"mlflow_model": None, "registered_model": None}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        ckpt.mkdir()
        for name in (META, "model.pt", "ema.pt"):
            shutil.copy2(Path(checkpoint) / name, ckpt / name)
        logger = SafeLogger(uri, run_id)
        logger.artifact(ckpt, "model")
        logger.close()
        try:
            info = _log_mlflow_model(uri, run_id, load_model(ckpt), ckpt, register_as)
        except Exception as err:  # the checkpoint artifact above is what the pipeline needs; this is a convenience
            warnings.warn(f"MLflow Model not logged: {type(err).__name__}: {str(err)[:300]}", RuntimeWarning,
                          stacklevel=2)
            return out
    out["mlflow_model"] = info.model_uri
    if register_as:
        out["registered_model"] = f"models:/{register_as}/{info.registered_model_version}"
        try:
            describe_model_version(uri, register_as, str(info.registered_model_version), checkpoint, data)
        except Exception as err:  # the version exists; its description is a convenience
            warnings.warn(f"model version not described: {type(err).__name__}: {str(err)[:300]}", RuntimeWarning,
                          stacklevel=2)
    return out


def describe_model_version(uri: str, name: str, version: str, checkpoint: str, data: dict | None = None) -> None:
    """What a registry browser should see of a version without opening its run: a one-paragraph description (method,
    path, coupling, model and size, training steps, data set and digest) and the same as `flowray.*` tags."""
    from mlflow.tracking import MlflowClient

    from fm.methods import describe

    loaded = load_model(checkpoint)
    meta, method = loaded.meta, loaded.meta.method
    path, coupling = describe(method["name"], method.get("ot_scope", "local"))
    size = sum(p.numel() for p in loaded.model.parameters())
    tags = {"flowray.method": method["name"], "flowray.path": path, "flowray.coupling": coupling,
            "flowray.model": meta.model_name, "flowray.parameters": str(size),
            "flowray.train_steps": str(meta.step)}
    text = (f"{method['name']}: {path} path, {coupling} coupling; a {meta.model_name} of {size:,} parameters "
            f"trained {meta.step} steps")
    if data:
        tags.update({"flowray.data": data["name"], "flowray.data_digest": data["digest"]})
        text += f" on {data['name']} ({data['profile']['num_rows']} rows, digest {data['digest']})"
    client = MlflowClient(uri)
    client.update_model_version(name, version, description=text + ".")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def tag_model_version(uri: str, spec: str, values: dict[str, object]) -> str | None:
    """Set `flowray.*` tags (the latest evaluation's figures) on the registry version a `models:/NAME/VERSION` or
    `models:/NAME@ALIAS` spec names; returns "NAME/VERSION", or None for any other checkpoint spec."""
    from mlflow.tracking import MlflowClient

    if not spec.startswith("models:/"):
        return None
    client = MlflowClient(uri)
    name, version = parse_model_uri(spec)
    if version.startswith("@"):
        version = client.get_model_version_by_alias(name, version[1:]).version
    for key, value in values.items():
        if value is not None:
            client.set_model_version_tag(name, str(version), f"flowray.{key}", str(value))
    return f"{name}/{version}"


def _log_mlflow_model(uri: str, run_id: str, loaded, ckpt: Path, register_as: str | None):
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = loaded.model.float().eval()
    kw = loaded.meta.model_kwargs
    shape = [kw["in_channels"], kw["image_size"], kw["image_size"]] if "image_size" in kw else [kw["dim"]]
    f32 = np.dtype(np.float32)
    inputs = [TensorSpec(f32, (-1, *shape), "x_t"), TensorSpec(f32, (-1,), "t")]
    example = [np.zeros((2, *shape), np.float32), np.full(2, 0.5, np.float32)]
    if kw.get("num_classes"):
        inputs.append(TensorSpec(np.dtype(np.int64), (-1,), "y"))
        example.append(np.zeros(2, np.int64))
    signature = ModelSignature(Schema(inputs), Schema([TensorSpec(f32, (-1, *shape), loaded.method.prediction)]))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            model, name="mlflow_model", signature=signature, input_example=tuple(example),
            extra_files=[str(p) for p in sorted(ckpt.iterdir())], registered_model_name=register_as,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def parse_model_uri(spec: str) -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (NAME, "VERSION" or "@ALIAS"), each part checked as one
    name (`storage.check_name`): they name the registry cache's folders, so neither may reach outside it."""
    rest = spec[len("models:/"):]
    name, at, alias = rest.partition("@")
    if not at:
        name, slash, version = rest.rpartition("/")
        if not slash:
            raise CheckpointError(f"--checkpoint: {spec!r} is not a registered model URI; expected "
                                  "models:/NAME/VERSION or models:/NAME@ALIAS")
    storage.check_name(name, "--checkpoint (registered model name)", also=":")
    if at:
        storage.check_name(alias, "--checkpoint (alias)", also=":@")
        return name, f"@{alias}"
    return name, storage.check_name(version, "--checkpoint (version)", also=":@")


def resolve_checkpoint(spec: str, uri: str, cache: str | Path = "outputs/checkpoints") -> str:
    """A checkpoint directory from a path, `runs:/RUN_ID` (the training run's logged checkpoint), or a registered
    model `models:/NAME/VERSION` or `models:/NAME@ALIAS` (its extra files hold the checkpoint). Downloads go to
    `cache`; a registered model's folder there is replaced on every call (an alias may have moved), and only after
    its path is proven to lie inside the cache's own `models` folder."""
    if spec.startswith("models:/"):
        from mlflow.artifacts import download_artifacts

        name, which = parse_model_uri(spec)
        models = (Path(cache) / "models").resolve()
        dst = (models / name / which).resolve()
        if dst.parent.parent != models:  # two components under the cache's models folder, or nothing is deleted
            raise CheckpointError(f"--checkpoint: {spec!r} would be cached outside {models}")
        shutil.rmtree(dst, ignore_errors=True)  # an alias may have moved since the last download
        dst.mkdir(parents=True)
        try:
            local = download_artifacts(artifact_uri=spec, dst_path=str(dst), tracking_uri=uri)
        except Exception as err:
            raise CheckpointError(f"cannot fetch registered model {spec} from {uri}: "
                                  f"{str(err).splitlines()[0][:300]}") from None
        ckpt = Path(local) / "extra_files"
        if not (ckpt / META).exists():
            raise CheckpointError(f"{spec} is not a flowray model: it holds no extra_files/{META}")
        return str(ckpt)
    if not spec.startswith("runs:/"):
        return spec
    from mlflow.tracking import MlflowClient

    run_id = storage.check_name(spec[len("runs:/"):].strip("/").split("/")[0], "--checkpoint (run id)")
    dst = Path(cache) / run_id
    if not (dst / "model" / META).exists():
        dst.mkdir(parents=True, exist_ok=True)
        try:
            MlflowClient(uri).download_artifacts(run_id, "model", str(dst))
        except Exception as err:
            raise CheckpointError(f"cannot fetch the model of MLflow run {run_id} from {uri}: "
                                  f"{str(err).splitlines()[0][:300]}") from None
    return str(dst / "model")


def start_child_run(uri: str, train_run_id: str | None, kind: str, run_name: str,
                    experiment: str | None = None, description: str | None = None) -> str:
    """A run nested under the training run (same experiment) and tagged with its id; or a run in `experiment`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tags = {**source_tags(description), "flowray.kind": kind, "mlflow.runName": run_name}
    exp_id = None
    if train_run_id:
        try:
            exp_id = client.get_run(train_run_id).info.experiment_id
            tags.update({"flowray.train_run_id": train_run_id, "mlflow.parentRunId": train_run_id})
        except Exception:
            warnings.warn(f"training run {train_run_id} is not in {uri}; logging without lineage",
                          RuntimeWarning, stacklevel=2)
    if exp_id is None:
        exp_id = get_or_create_experiment(client, experiment or "flowray", uri)
    return client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id


def dataset_input(name: str, digest: str, location: str, context: str, profile: dict | None = None):
    """An MLflow dataset input: the rows a run read (a split of an ingest output, or a sampling output), named, with
    a content digest, where they lie, and the run's use of them as context ("train", "evaluation", "reference",
    "floor", "samples"), so that MLflow's lineage view and the runs table show which data a run used."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    scheme = location.split("://", 1)[0] if "://" in location else "local"
    dataset = Dataset(name=name, digest=digest, source_type=scheme, source=json.dumps({"uri": location}),
                      profile=json.dumps(profile) if profile else None)
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])


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
            warnings.warn(f"MLflow system metrics not logged: {type(err).__name__}: {str(err)[:200]}",
                          RuntimeWarning, stacklevel=3)
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
