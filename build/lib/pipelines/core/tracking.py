"""MLflow runs and experiments: the tracking URI (checked before any cluster work), experiments with an absolute
artifact location, runs found again by name, child runs nested under a training run, dataset inputs, and the source
tags of a job. The background logger is `pipelines.core.run_logger`, the model registry `pipelines.core.registry`, the
system metrics `pipelines.core.system_metrics`."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

from pipelines.core.errors import ConfigError

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
        db = Path(uri[len("sqlite:///") :])
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
        raise ConfigError(
            f"{key}: {uri!r} has the scheme {parsed.scheme!r}, which MLflow has no tracking store "
            f"for; allowed: {', '.join(TRACKING_SCHEMES)} (or a local folder)"
        )
    if scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is None or not db.name:
            raise ConfigError(f"{key}: {uri!r} is not a sqlite database URI; write sqlite:///path/to/mlflow.db")
        if not db.parent.is_dir():
            raise ConfigError(
                f"{key}: the folder of the sqlite database {db} does not exist; create it, or point "
                "the key (or $MLFLOW_TRACKING_URI) elsewhere"
            )
        if db.is_dir():
            raise ConfigError(f"{key}: {db} is a folder, not a sqlite database file; write sqlite:///path/to/mlflow.db")
        if db.is_file() and db.stat().st_size:  # an empty file becomes a new database; anything else must be one
            with open(db, "rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise ConfigError(
                    f"{key}: {db} is not a sqlite database (its first bytes are {head[:12]!r}); point "
                    "the key (or $MLFLOW_TRACKING_URI) at an MLflow database or a new file"
                )
    if scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
    except urllib.error.HTTPError as err:  # something answers, but not as an MLflow server does
        raise ConfigError(
            f"{key}: the server at {uri} answers HTTP {err.code} ({err.reason}) to /health; is it "
            "an MLflow tracking server (`mlflow server`)?"
        ) from None
    except Exception as err:  # URLError, timeouts: the server is not usable
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"{key}: the MLflow server at {uri} does not answer ({reason}); start it, or point "
            "the key (or $MLFLOW_TRACKING_URI) elsewhere"
        ) from None


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
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=EXPERIMENT_KIND)


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
            commit = subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
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
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`flowray.run_name` = '{run_name}' and tags.`flowray.storage` = '{storage}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def create_run(
    uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None
) -> str:
    """A new run tagged with `run_name` (and `tags`); returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, experiment, uri)
    all_tags = {**source_tags(), "flowray.run_name": run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id


def find_or_create_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    resume: bool = True,
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """The id of the run tagged with run_name (and the same `flowray.storage` tag) in the experiment, set RUNNING
    again (resume=True), or of a new one. Returns (run_id, resumed)."""
    from mlflow.tracking import MlflowClient

    if resume:
        found = find_run(uri, experiment, run_name, (tags or {}).get("flowray.storage", ""))
        if found:
            MlflowClient(uri).update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id, True
    return create_run(uri, experiment, run_name, tags, parent_run_id), False


def start_child_run(
    uri: str,
    train_run_id: str | None,
    kind: str,
    run_name: str,
    experiment: str | None = None,
    description: str | None = None,
) -> str:
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
            warnings.warn(
                f"training run {train_run_id} is not in {uri}; logging without lineage", RuntimeWarning, stacklevel=2
            )
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
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type=scheme,
        source=json.dumps({"uri": location}),
        profile=json.dumps(profile) if profile else None,
    )
    return DatasetInput(dataset, [InputTag("mlflow.data.context", context)])
