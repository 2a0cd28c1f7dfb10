"""One job at a time per run: a lease file in the run's own storage folder (a local path or an object-store prefix).

A training run, a sweep or a reflow chain takes the lease of its folder before it writes anything there; a second job
that names the same folder while the first is alive is refused in words, before Ray starts. A lease names its
holder (host, pid, when it started) and is renewed every `HEARTBEAT_S` seconds while the job runs. A job that died
without releasing its lease does not leave the folder stuck: on the holder's own host a lease whose process is gone
is free at once; elsewhere (a shared file system, an object store) a lease not renewed for `STALE_S` seconds is.

Taking a lease is atomic on a local file system (the file is created with O_EXCL; a stale one is renamed away first,
which only one taker can do). Object stores have no create-if-absent in pyarrow: there the taker writes its lease,
waits `SETTLE_S` and reads it back, and the last writer of two simultaneous takers wins (S3 and GCS are strongly
consistent for a read after a write), the other refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

from pipelines.core import storage
from pipelines.core.errors import ConfigError

LEASE = ".flowray-lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0
SETTLE_S = 2.0
_HELD: set[str] = set()  # the tokens of the leases this process holds now


class LeaseHeld(ConfigError):
    """Another live job holds the folder's lease."""


@dataclass
class Lease:
    """A lease this process holds; `release` it (or use it as a context manager) when the job ends."""

    path: str
    holder: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a job that ends because its object store stopped answering leaves the file alone: a read or delete of it
        # would wait out every attempt's timeout (minutes by default: `storage.REQUEST_TIMEOUT_S`) before the job's
        # one line, and the lease goes stale on its own, as a killed job's does
        lost = exc is not None and storage.is_uri(self.path) and storage.outage_in(exc) is not None
        self.release(touch_store=not lost)

    def release(self, touch_store: bool = True) -> None:
        """Stop renewing, and delete the lease file if it is still this job's (with `touch_store`)."""
        self._stop.set()
        _HELD.discard(self.holder["token"])
        if not touch_store:
            return
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (_read(self.path) or {}).get("token") == self.holder["token"]:
                storage.delete(self.path)
        except (OSError, ConfigError):
            pass  # an unreachable store: the lease goes stale on its own

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _write(self.path, {**self.holder, "renewed": time.time()})
            except (OSError, ConfigError):
                pass  # a store that is down now: the next renewal tries again


def acquire(folder: str, what: str, key: str) -> Lease:
    """Take the lease of `folder` for `what` (e.g. "training run digits-cpu"), or `LeaseHeld` naming `key` (the
    setting that chose the folder), the holder and how to proceed."""
    path = storage.join(folder, LEASE)
    now = time.time()
    token = uuid.uuid4().hex
    holder = {
        "token": token,
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "renewed": now,
    }
    if storage.is_uri(folder):
        _take_shared(path, holder, key)
    else:
        _take_local(path, holder, key)
    _HELD.add(token)
    lease = Lease(path, holder)
    lease._thread = threading.Thread(target=lease._renew, name="flowray-lease", daemon=True)
    lease._thread.start()
    return lease


def _take_local(path: str, holder: dict, key: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read(path)
            if held is not None and _alive(held):
                raise _held(held, path, key) from None
            try:  # stale or unreadable: move it away (only one taker's rename succeeds), then create ours
                os.rename(path, f"{path}.stale-{holder['token']}")
                os.remove(f"{path}.stale-{holder['token']}")
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        return
    raise _held(_read(path) or {}, path, key)


def _take_shared(path: str, holder: dict, key: str) -> None:
    held = _read(path)
    if held is not None and _alive(held):
        raise _held(held, path, key)
    _write(path, holder)
    _settle()
    now = _read(path) or {}
    if now.get("token") != holder["token"]:
        raise _held(now, path, key)


def _settle() -> None:
    """Wait for a taker that wrote at the same moment: whoever wrote last holds the lease."""
    time.sleep(SETTLE_S)


def _alive(held: dict) -> bool:
    """Whether a lease's holder may still run: on this host, its process (the same one: started no later than the
    lease) exists, and where that is this process, it still holds the lease (a job run in process, as in a notebook,
    that ended without releasing it: a lost store); elsewhere, it renewed the lease within `STALE_S` seconds."""
    if held.get("host") == socket.gethostname():
        if held.get("pid") == os.getpid():  # this process (a notebook's rerun): only a lease it still holds
            return held.get("token") in _HELD
        try:
            proc = psutil.Process(int(held["pid"]))
            return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= float(held["started"]) + 1
        except (psutil.Error, KeyError, TypeError, ValueError):
            return False
    return time.time() - float(held.get("renewed", 0)) < STALE_S


def _held(held: dict, path: str, key: str) -> LeaseHeld:
    ago = time.time() - float(held.get("started", time.time()))
    return LeaseHeld(
        f"{key}: {held.get('what', 'another job')} is running already (process {held.get('pid')} on "
        f"{held.get('host')}, started {ago:.0f} s ago; its lease is {path}); two jobs cannot share one "
        f"run: wait for it to end, stop it, or choose another name. A job that died frees its lease at "
        f"once on its own host, and after {STALE_S:.0f} s without renewal elsewhere"
    )


def _read(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write(path: str, holder: dict) -> None:
    storage.write_text(path, json.dumps(holder))
