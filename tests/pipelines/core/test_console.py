"""The console filter of a job run as its own process: exactly Ray's known non-errors are dropped, everything else
(progress bars included) goes through as written."""

from pipelines.core.console import KNOWN_NOISE, NoiseFilter

CORE_WORKER = (
    b"[2026-12-05 10:01:02,345 E 1234 5678] core_worker.cc:2876: Actor with class name: "
    b"'MapWorker(MapBatches(Sampler))' and ID: '0b1c...' has constructor arguments in the object store and "
    b"max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    b"will fail. See https://github.com/ray-project/ray/issues/53727 for more details."
)
GCS = b"[2026-12-05 10:01:09,001 E 1300 1300] gcs_actor_scheduler.cc:193: Failed to kill actor NIL_ID, status: ..."
GONE = (
    b"[2026-12-05 19:27:49,674 E 24299 24299] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
    b"90d03d3c6e3020ada47036c901000000, return status: Invalid: KillActor RPC failed for actor "
    b"90d03d3c6e3020ada47036c901000000: RpcError: RPC error: Socket closed rpc_code: 14"
)
CLEANER = [
    b"(PlacementGroupCleaner pid=4321) Exception in thread PlacementGroupCleanerMonitor:",
    b"(PlacementGroupCleaner pid=4321) Traceback (most recent call last):",
    b'(PlacementGroupCleaner pid=4321)   File "threading.py", line 1045, in _bootstrap_inner',
    b"(PlacementGroupCleaner pid=4321) ConnectionError: Found multiple active Ray instances: {'a', 'b'}. "
    b"Please specify the one to connect to",
]


def test_only_the_known_lines_are_dropped():
    out = []
    f = NoiseFilter(out.append)
    kept = [
        b"[flowray 10:01:00] sampling 64 samples",
        b"[2026-12-05 10:01:03,000 E 1 2] raylet.cc: a real error",
        b"Traceback (most recent call last):",
        b'  File "x.py", line 1',
        b"ValueError: ours",
        b"[2026-12-05 10:01:04,000 E 3 3] gcs_actor_scheduler.cc:538: Failed to kill actor 9a: Timeout",
    ]
    stream = [kept[0], CORE_WORKER, kept[1], *CLEANER, kept[2], GCS, kept[3], GONE, kept[4], kept[5]]
    data = b"\n".join(stream) + b"\n"
    for k in range(0, len(data), 37):  # in chunks that split lines anywhere, as a pipe delivers them
        f.feed(data[k : k + 37])
    f.flush()
    assert b"".join(out) == b"".join(line + b"\n" for line in kept)
    assert len(KNOWN_NOISE) == 3


def test_a_progress_bar_redraw_goes_through_before_its_line_ends():
    out = []
    f = NoiseFilter(out.append)
    f.feed(b"Running 0/2\rRunning 1/2\r")
    assert b"".join(out) == b"Running 0/2\rRunning 1/2\r"
    f.feed(b"Running 2/2\n")
    f.flush()
    assert b"".join(out) == b"Running 0/2\rRunning 1/2\rRunning 2/2\n"
