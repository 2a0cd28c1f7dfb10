"""A watchdog for the local Ray a driver starts: when the driver dies without shutting Ray down (SIGKILL, OOM
killer), Ray's agents and workers would outlive it; the watchdog stops them within a few seconds.

`init_ray` starts it (`python -m pipelines.core.reaper DRIVER_PID ROOT_PID...`) in a session of its own, so that a
terminal's Ctrl-C or a kill of the driver's process group does not reach it. It follows the processes Ray started
(the roots and all their descendants, refreshed while the driver lives) and exits by itself once they are gone,
as after `ray.shutdown()`. What it stops is listed in one line on stderr (kept in the log file it is given).
"""

from __future__ import annotations

import sys
import time

import psutil

POLL_S = 0.5  # how often the driver and the process tree are looked at
GRACE_S = 3.0  # SIGTERM first; SIGKILL what is still there after this


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(roots: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    """The live roots and every live descendant, keyed by PID (a Process compares its create time too, so a PID
    reused by an unrelated process is never mistaken for one of Ray's)."""
    found: dict[int, psutil.Process] = {}
    for p in roots.values():
        if not alive(p):
            continue
        found[p.pid] = p
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return found


def stop(processes: list[psutil.Process], grace: float = GRACE_S) -> list[str]:
    """SIGTERM, wait up to `grace` seconds, SIGKILL the rest. Returns "name(pid)" of each process stopped."""
    live = [p for p in processes if alive(p)]
    names = []
    for p in live:
        try:
            names.append(f"{p.name()}({p.pid})")
            p.terminate()
        except psutil.Error:
            pass
    _, rest = psutil.wait_procs(live, timeout=grace)
    for p in rest:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(rest, timeout=grace)
    return names


def watch(driver_pid: int, root_pids: list[int], poll: float = POLL_S) -> list[str]:
    """Follow the tree under `root_pids` while `driver_pid` lives; when the driver dies first, stop the tree."""
    driver = psutil.Process(driver_pid)
    roots = {}
    for pid in root_pids:
        try:
            roots[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass
    known = _tree(roots)
    while known:
        if not alive(driver):
            known.update(_tree(known))  # the orphans: children started since the last look included
            return stop(list(known.values()))
        time.sleep(poll)
        known = {**{pid: p for pid, p in known.items() if alive(p)}, **_tree(roots)}
    return []  # Ray was shut down normally


def main(argv: list[str]) -> None:
    driver_pid, *root_pids = (int(a) for a in argv)
    stopped = watch(driver_pid, root_pids)
    if stopped:
        print(
            f"[flowray reaper {time.strftime('%H:%M:%S')}] driver {driver_pid} died without shutting down its "
            f"local Ray; stopped {len(stopped)} processes: {', '.join(stopped)}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
