"""The Ray runtime every stage shares: joining a cluster or starting a local one, and how loud the console is.

By default the console shows Ray's warnings and errors, the project's own one line per stage, one line per
training logging window, and Ray Data's progress bars; `--verbose` (or `set_verbose(True)`) restores Ray's full
INFO logging (operator plans, controller state changes, worker start-up).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Literal

import psutil

from pipelines.core.console import NoiseFilter
from pipelines.core.errors import ConfigError, JobStopped

_state: dict[str, Any] = {"verbose": False, "stop_on_signals": False, "local_ray": None}


def set_verbose(verbose: bool) -> None:
    """Choose the console's loudness for this process (before `init_ray`)."""
    _state["verbose"] = bool(verbose)
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # read by MLflow when it is first imported, and by Ray Train's workers (which inherit this environment
        # from a local Ray): without the print patch a worker's print reaches the driver once, as Ray prints it
        for key, value in (
            ("MLFLOW_LOGGING_LEVEL", "WARNING"),
            ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
            ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
        ):
            os.environ.setdefault(key, value)


def is_verbose() -> bool:
    return _state["verbose"]


def actor_device(gpus: float):
    """Where an actor or task that reserved `gpus` GPUs runs torch: its GPU when it asked for one and one is
    visible, else the CPU."""
    import torch

    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


# this process's OS niceness before `use_cpu_share` lowered it (what `nice` is added to)
_START_NICENESS = os.nice(0)


def use_cpu_share(cpus: float, nice: int = 0) -> int:
    """Give this Ray worker or actor as many torch threads as the CPUs it reserved (at least one), and return that;
    with `nice` > 0, also lower its OS priority to `nice` above the niceness it started with (at most 19). Calling
    it again with the same `nice` changes nothing, so a pooled worker may run one such task after another; a
    priority once lowered cannot be raised back, so a task that passes `nice` > 0 also takes `nice_args(nice)`,
    which keeps it on workers of its own.

    Ray does not set the thread count of a Train worker, and torch's default is every core of the node: two
    workers on two cores then run four threads that wait on each other, about 3x slower than one thread each
    (measured on a 2-core machine: 41 against 114 images/s per worker, `benchmarks.train_overhead` in BENCHMARKS.md).
    """
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    if nice > 0:
        os.nice(max(0, min(19, _START_NICENESS + nice) - os.nice(0)))
    return threads


def nice_args(nice: int) -> dict:
    """Ray's remote arguments for a task that lowers its priority by `nice` (`use_cpu_share`): a runtime_env that
    names the niceness, which gives its tasks a pool of workers of their own (Ray keeps a pool per runtime_env).
    A worker whose priority was lowered then only ever runs tasks that ask for the same, and the next stage at that
    priority finds it warm (a plain task never inherits it). No arguments ({}) for 0."""
    return {"runtime_env": {"env_vars": {"FLOWRAY_NICE": str(nice)}}} if nice > 0 else {}


ADDRESS_TIMEOUT_S = 10.0  # how long a cluster's address may take to accept a connection


def check_address(address: str | None, key: str = "ray.address", timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail in seconds, naming the key, on a cluster address where nothing accepts a connection: `ray.init` would
    retry for minutes. `auto`, `local` and an empty address (a local Ray) are not probed. SIGINT and SIGTERM end the
    wait at once (`interruptible`)."""
    import socket

    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"{key}: {address!r} is not a cluster address; expected HOST:PORT (the head's GCS, as "
            "`ray start --head` prints it), ray://HOST:PORT, or auto"
        )

    def connect() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic())):
                    return
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"{key}: nothing accepts a connection at {hostport} within {timeout:.0f} s "
                        f"({err.strerror or err}); start the cluster's head (`ray start --head`) or "
                        "correct the address, or leave ray.address empty for a local Ray"
                    ) from None
                time.sleep(0.5)

    interruptible(connect)


def init_ray(address: str | None = None, local_cpus: int = 4) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a local one.

    A local Ray gets at least `local_cpus` logical CPUs: Ray Data's read tasks ask for a whole CPU, and on a
    2-core host the train workers and preprocessing actors would otherwise leave none, hanging the job.
    A local Ray listens on 127.0.0.1 only (GCS, raylet, workers, agents, dashboard), and a watchdog
    (`pipelines.core.reaper`) stops its processes should this driver die without shutting it down.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = not is_verbose()
    set_verbose(not quiet)
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if quiet:
        # the level of Ray's own loggers in every worker and actor (Ray Data's operator plans, Train's
        # controller); prints of the project's workers (the training progress lines) still reach the driver
        kwargs["logging_level"] = logging.WARNING
        kwargs["logging_config"] = ray.LoggingConfig(log_level="WARNING")
    if quiet:
        # Ray Data configures its own logger in every process from this variable (workers inherit it from a local
        # Ray; on a cluster only this driver's logger is quietened)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray Train on one machine: no node can be preempted, so no preemption-watcher actor (a process of its
        # own per fit), and the controller sees a finished worker group within 0.5 s instead of 2 (both together
        # measured 4 to 9 s less per TorchTrainer.fit of a tiny 2-worker run on 2 cores: 38-52 s against 43-56)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        _loopback_only()
        before = {p.pid for p in psutil.Process().children()}
        _init_local(ray, num_cpus=max(os.cpu_count() or 1, local_cpus), dashboard_host="127.0.0.1", **kwargs)
        # the GCS of the local Ray this process started: its node has os.cpu_count() real cores under its CPUs
        _state["local_ray"] = ray.get_runtime_context().gcs_address
        _start_reaper([p.pid for p in psutil.Process().children() if p.pid not in before])
    configure_ray_data("driver", quiet)
    if _state["stop_on_signals"]:  # again after ray.init, whose core worker installs a SIGTERM handler of its own
        stop_on_signals()


def _shapes(address: str | None, local_cpus: int) -> tuple[list[dict], dict[str, float], str]:
    """What a stage's resource requests are checked against: (node shapes, total resources, the cluster in words).
    A local Ray not started yet is this machine as `init_ray` will start it (its logical CPUs, its GPUs); a running
    Ray is its live nodes, plus the node types its autoscaler may add (total: at their max counts) where it has one."""
    import ray

    if not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        import torch

        cores = os.cpu_count() or 1
        node = {"CPU": float(max(cores, local_cpus)), "GPU": float(torch.cuda.device_count())}
        return (
            [node],
            dict(node),
            (
                f"this machine's local Ray ({node['CPU']:g} logical CPUs: ray.local_cpus="
                f"{local_cpus} on {cores} cores; {node['GPU']:g} GPUs)"
            ),
        )
    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    totals: dict[str, float] = {}
    for n in nodes:
        for r, v in n.items():
            totals[r] = totals.get(r, 0.0) + v
    where = f"this Ray's {len(nodes)} node(s) ({', '.join(_fmt(n, ('CPU', 'GPU')) for n in nodes)})"
    try:  # an autoscaling cluster: the node types it may start (a private API of Ray's; absent on a local Ray)
        from ray._private.state import state

        config = state.get_cluster_config()
        for group in config.node_group_configs if config is not None else []:
            shape = {r: float(v) for r, v in group.resources.items()}
            nodes.append(shape)
            for r, v in shape.items():
                totals[r] = totals.get(r, 0.0) + (math.inf if group.max_count < 0 else v * group.max_count)
            where += f"; node type {group.name} ({_fmt(shape, ('CPU', 'GPU'))}, up to {group.max_count})"
    except Exception:
        pass
    return nodes, totals, where


def _fmt(res: dict, keys=None) -> str:
    return ", ".join(f"{res.get(r, 0.0):g} {r}" for r in (keys or res))


def check_resources(
    bundle: dict[str, float],
    count: int,
    what: str,
    keys: str,
    address: str | None = None,
    local_cpus: int = 4,
    beside: dict[str, float] | None = None,
) -> None:
    """Refuse, before a stage starts, `count` requests of `bundle` (e.g. {"CPU": 0.5, "GPU": 0}) that the cluster
    cannot give: one that fits no node, or more in all (with `beside`, what other work needs next to them) than it
    has. Ray would wait for them for ever (no node can take the work) or loop on its start-up timeouts. `what` names
    one request, `keys` the settings that size them. A cluster at `address` is joined to read its nodes."""
    import ray

    if not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS")):
        init_ray(address)
    need = {r: float(v) for r, v in bundle.items() if v > 0}
    nodes, totals, where = _shapes(address, local_cpus)
    if not any(all(n.get(r, 0.0) >= v for r, v in need.items()) for n in nodes):
        raise ConfigError(
            f"{keys}: each {what} asks for {_fmt(need)}, which no node of {where} has; lower the "
            "request, or run on a cluster with such nodes (ray.address)"
        )
    want = {r: need.get(r, 0.0) * count + (beside or {}).get(r, 0.0) for r in {*need, *(beside or {})}}
    short = [r for r, v in want.items() if totals.get(r, 0.0) < v]
    if short:
        raise ConfigError(
            f"{keys}: {count} {what}(s) ask for {_fmt({r: need.get(r, 0.0) * count for r in short})}"
            + (f" and the work beside them {_fmt({r: beside.get(r, 0.0) for r in short})}" if beside else "")
            + f" in all, but {where} has {_fmt(totals, short)}; lower the count or the "
            "request, or add nodes"
        )


RESOURCE_SLIVER = 0.001  # what an actor asks of a node label (a custom resource): a mark, not a share


def resource_args(resource: str) -> dict:
    """Ray's remote arguments that keep a task or actor on the nodes that carry the custom resource `resource` (a
    node label: `ray start --resources='{"scoring": 1}'`), each asking `RESOURCE_SLIVER` of it; none for ""."""
    return {"resources": {resource: RESOURCE_SLIVER}} if resource else {}


def actor_pool(
    actors: int,
    cpus: float,
    gpus: float = 0.0,
    memory: int = 0,
    work: int = 0,
    section: str = "",
    resource: str = "",
) -> tuple[int, int]:
    """An actor stage's pool (after `init_ray`): (how many actors, the memory each declares to Ray).

    The count is `actors` when it is set (> 0). Auto (0): one per `gpus` of the cluster's GPUs for GPU actors; for
    CPU actors, one per `max(1, int(cpus))` cores (an actor's torch threads, `use_cpu_share`) of the cores the
    stage may take: a local Ray's real cores (its logical CPUs are more, for Ray Data's read tasks), or every
    node's CPUs less one (left to those tasks); either way no more than the cluster's memory resource holds at
    `memory` bytes each, nor than the stage's `work` items (blocks, batches) when given, and at least one. A
    request the cluster cannot give is refused first (`check_resources`; `section` names the settings). With
    `resource` (a node label, `resource_args`), only the nodes that carry it count, and a cluster without one is
    refused.
    The declared memory is `memory`, or the largest node's memory resource when that is less (an actor that no
    node could place would wait forever; `pipelines.core.memory.check_fits` has already refused what this machine
    cannot hold)."""
    import ray

    keys = f"{section}.actors={actors}, {section}.cpus_per_actor={cpus:g}, {section}.gpus_per_actor={gpus:g}"
    bundle = {"CPU": cpus, "GPU": gpus}
    if resource:
        keys += f", {section}.resource={resource}"
        bundle[resource] = RESOURCE_SLIVER
    check_resources(bundle, max(actors, 1), "actor", keys)
    # with a label (`resource_args`), the pool is sized by the labelled nodes alone
    nodes = [
        node["Resources"] for node in ray.nodes() if node["Alive"] and (not resource or resource in node["Resources"])
    ]
    memory = min(memory, int(max(node.get("memory", 0) for node in nodes)))
    if actors > 0:
        return actors, memory
    if gpus > 0:
        n = int(sum(node.get("GPU", 0) for node in nodes) // gpus)
    else:
        local = _state["local_ray"] == ray.get_runtime_context().gcs_address
        cores = (os.cpu_count() or 1) if local else sum(max(0, int(node.get("CPU", 0)) - 1) for node in nodes)
        n = cores // max(1, int(cpus))
    if memory > 0:
        n = min(n, int(ray.available_resources().get("memory", 0) // memory))
    if work > 0:  # an actor without an input would only load the model
        n = min(n, work)
    return max(1, n), memory


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise `JobStopped` in the main thread, so that the running stage can mark its MLflow run
    KILLED, say what it keeps and stop Ray. A second signal while stopping ends the process at once. For jobs
    (`jobs.cli.run_job`); from then on `init_ray` installs the handlers again over Ray's."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["stop_on_signals"] = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_stopped)


def default_signals() -> None:
    """Undo `stop_on_signals` (when a job run in process returns): Python's SIGINT, the default SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["stop_on_signals"] = False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interruptible(fn, *args):
    """`fn(*args)` in a thread of its own while this, the main thread, waits for it: there a signal's `JobStopped`
    is raised at once, where a blocking Ray call (`ray.get` inside `TorchTrainer.fit`) would hold it back until it
    returns. Without `stop_on_signals` (a library caller) or off the main thread, `fn` simply runs here."""
    if not _state["stop_on_signals"] or threading.current_thread() is not threading.main_thread():
        return fn(*args)
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as err:  # re-raised in the caller's thread, traceback and all
            box["error"] = err

    worker = threading.Thread(target=target, name="flowray-stage", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _raise_stopped(signum: int, frame) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise JobStopped(signum)


def _init_local(ray, attempts: int = 3, **kwargs) -> None:
    """Start a local Ray, again after a node start-up timeout: Ray waits a fixed 30 s for its raylet to register,
    which a machine busy with other work (another Ray, a build) can exceed; the processes of the failed start are
    stopped before the next."""
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children()}
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            for p in started:
                p.kill()
            psutil.wait_procs(started, timeout=10)
            stage(
                f"local Ray did not start within Ray's 30 s (a busy machine?); starting it again "
                f"({attempt + 1} of {attempts})"
            )


def _loopback_only() -> None:
    """Make a local Ray's node address 127.0.0.1, so that every server of it binds loopback only.

    Ray's servers bind the node's address, and `ray.init` replaces a loopback `_node_ip_address` by the host's
    routable one unless Ray clusters are off for this host, as Ray does by default on macOS and Windows. The
    variable reaches the processes Ray starts; the constant is already read if ray was imported before.
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1` in the environment keeps Ray's own behaviour.
    """
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] not in ("0", "false")


def _start_reaper(root_pids: list[int]) -> None:
    """The watchdog that stops this local Ray's processes if the driver dies without `ray.shutdown()`."""
    import subprocess

    if root_pids:
        # its one line goes to the real stderr, not through the console filter, which dies with the driver
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.core.reaper", str(os.getpid()), *map(str, root_pids)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=_state.get("console_fd"),
            start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )


def configure_ray_data(purpose: Literal["driver", "train_stream", "scoring"], quiet: bool = True) -> None:
    """This process's Ray Data `DataContext`, set here and nowhere else, for what the process runs:

    - "driver" (`init_ray`): tqdm bars on the driver's terminal (logged at INFO with --verbose otherwise); `quiet`:
      no bars relayed line by line from other processes (actors, Train workers) into the driver's log, and no
      operator plan of every dataset;
    - "train_stream" (a Train worker's stream, `pipelines.train.stream.build_stream`): the steps arrive in order;
    - "scoring" (sample quality while training, on the controller): no bars, the console is the trainers' lines.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    if purpose == "driver":
        ctx.enable_progress_bars = True
        ctx.use_ray_tqdm = not quiet
        ctx.print_on_execution_start = not quiet
    elif purpose == "train_stream":
        ctx.execution_options.preserve_order = True
    elif purpose == "scoring":
        ctx.enable_progress_bars = False
    else:
        raise ValueError(f"unknown Ray Data purpose {purpose!r}; allowed: driver, train_stream, scoring")


def quiet_train_worker() -> None:
    """In a Ray Train worker (quiet mode): Train V2 logs every report at INFO through a logger named by its file
    path, outside the `ray.train` hierarchy that `train_logging_config` sets, so it is quietened by name; the
    worker's own Ray Data stream (`pipelines.train.stream`) logs its start and end at INFO, which the driver's log would
    show late, after the job's JSON result."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_logging_config():
    """Ray Train's own log level on the console: warnings by default, INFO with --verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


# Ray Data's parquet reader lists its files on a pool of `FooterReader` actors, 32 unless told, each a process of its
# own started for every read (twice: the schema's sample, then the listing) and killed after it. The pool hands them
# files in batches of 10, so a read of two shards used one; on a Ray busy training, 5 to 9 more started for it before
# the read ended, about 1 s of CPU each (the MeanFlow case: 25 such processes, 2 with the pool sized; BENCHMARKS.md).
# Ray reads both counts from the environment when `ray.data.read_parquet` builds its file indexer.
_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_BATCH = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"


def footer_actors(files: int) -> int:
    """How many footer-reading actors a read of `files` parquet files uses: one per batch of footers, at least one,
    at most Ray's default of 32."""
    batch = max(1, int(os.environ.get(_FOOTER_BATCH, "10")))
    return min(32, max(1, -(-files // batch)))


def read_parquet(paths: list[str], fs: Any = None):
    """`ray.data.read_parquet(paths, filesystem=fs)` of parquet files (`storage.ray_paths` gives both), with Ray
    Data's footer-reading pool sized to them (`footer_actors`). $RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, where set,
    wins."""
    import ray

    sized = _FOOTER_ACTORS not in os.environ
    if sized:
        os.environ[_FOOTER_ACTORS] = str(footer_actors(len(paths)))
    try:
        return ray.data.read_parquet(paths, filesystem=fs)
    finally:
        if sized:
            del os.environ[_FOOTER_ACTORS]


def spread(ds, rows: int, batch_size: int, actors: int):
    """Split a split's few large blocks (one per shard) so that every actor of the pool gets batches."""
    blocks = min(max(1, -(-rows // batch_size)), 4 * actors)
    return ds.repartition(blocks) if blocks > 1 else ds


def stage(message: str) -> None:
    """One console line for a stage of a job (flushed, on stderr, so stdout's last line stays the JSON result)."""
    print(f"[flowray {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Progress:
    """A progress line with rate and ETA for a stage that completes `total` units (blocks, batches, images): at
    most one line every `every` seconds, and one at the end. Works the same on a terminal and in a log file."""

    def __init__(self, what: str, total: int, unit: str, every: float = 10.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start  # the first line after `every` seconds: the first unit includes start-up

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done < self.total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        # a slow stage (dopri5 blocks of a stiff model: one every 20-40 s) reads per minute, not "0.0 blocks/s"
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{60 * rate:.1f} {self.unit}/min"
        stage(
            f"{self.what}: {self.done}/{self.total} {self.unit}, {speed}, "
            + (f"ETA {eta:.0f} s" if self.done < self.total else f"done in {elapsed:.0f} s")
        )


# --- the console: Ray's known noise filtered out (pipelines.core.console) -----------------------------------


def filter_console_noise() -> None:
    """Route this process's stderr (file descriptor 2: Python's and Ray's C++ logging alike) through `NoiseFilter`.
    Only for a job run as its own process (not when a caller or a test captures stderr), once; restored at exit,
    after everything written was forwarded."""
    import atexit

    stderr = sys.stderr
    if _state.get("noise_filter") or is_verbose() or stderr is not sys.__stderr__ or stderr is None:
        return
    try:
        fd = stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return
    stderr.flush()
    saved = os.dup(fd)
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)
    out = NoiseFilter(lambda data: os.write(saved, data))

    def pump() -> None:
        while chunk := os.read(read, 65536):
            out.feed(chunk)
        out.flush()

    thread = threading.Thread(target=pump, name="flowray-console", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, fd)  # the pipe's last writer is gone: the pump reads to its end and stops
        thread.join(timeout=5)

    atexit.register(restore)
    _state["noise_filter"], _state["console_fd"] = True, saved
