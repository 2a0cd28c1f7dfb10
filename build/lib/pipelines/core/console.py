"""The console: Ray's known noise, lines a successful run prints that are not failures of this project's, filtered
out of a job's stderr (`pipelines.core.runtime.filter_console_noise` routes file descriptor 2 through
`NoiseFilter`). `--verbose` shows them."""

from __future__ import annotations

# Lines Ray prints on a successful run that are not failures of this project's, each matched by fragments that only
# it contains: Ray Data always passes a map stage's callable (and its constructor arguments) to the actor pool
# through the object store, which Ray's core worker reports as an error line for every restartable actor (ray#53727);
# GCS reports that it could not kill an actor that was never created (NIL_ID) or whose process had already exited
# ("Socket closed") when a stage's pool is torn down. `--verbose` shows them.
KNOWN_NOISE = (
    (b"has constructor arguments in the object store and max_restarts > 0",),
    (b"gcs_actor_scheduler.cc", b"Failed to kill actor NIL_ID"),
    (b"gcs_actor_scheduler.cc", b"Failed to kill actor", b"KillActor RPC failed", b"Socket closed"),
)
# a traceback block from Ray Train's placement-group cleaner when two local Rays run on one machine (RELIABILITY.md)
NOISE_BLOCK = (b"Exception in thread PlacementGroupCleanerMonitor", b"Found multiple active Ray instances", 40)


def is_noise(line: bytes) -> bool:
    return any(all(fragment in line for fragment in fragments) for fragments in KNOWN_NOISE)


class NoiseFilter:
    """Forwards what is written to it, line by line, dropping `KNOWN_NOISE` lines and `NOISE_BLOCK` blocks. A partial
    line is forwarded as soon as it ends in a carriage return (a progress bar redrawing itself)."""

    def __init__(self, write):
        self.write, self.buffer, self.skipping = write, b"", 0

    def feed(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        kept = [line for line in lines if self._keep(line)]
        if kept:
            self.write(b"".join(line + b"\n" for line in kept))
        cut = self.buffer.rfind(b"\r")
        if cut >= 0 and not self.skipping:
            self.write(self.buffer[: cut + 1])
            self.buffer = self.buffer[cut + 1 :]

    def flush(self) -> None:
        if self.buffer and self._keep(self.buffer):
            self.write(self.buffer)
        self.buffer = b""

    def _keep(self, line: bytes) -> bool:
        start, end, most = NOISE_BLOCK
        if self.skipping:
            self.skipping -= 1
            if end in line:
                self.skipping = 0
            return False
        if start in line:
            self.skipping = most
            return False
        return not is_noise(line)
