"""The progress line of a long stage: its rate is readable whether a unit takes milliseconds or a minute."""

import pipelines.core.runtime as runtime
from pipelines.core.runtime import Progress


def _lines(monkeypatch, capsys, seconds_per_unit: float, total: int) -> list[str]:
    clock = iter([0.0] + [seconds_per_unit * (i + 1) for i in range(total)])
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    progress = Progress("sampling", total, "blocks", every=0.0)
    for _ in range(total):
        progress.update()
    return [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]


def test_slow_stage_reads_per_minute(monkeypatch, capsys):
    # one dopri5 block of a stiff model every 40 s: 0.025 blocks/s would print as "0.0 blocks/s"
    assert _lines(monkeypatch, capsys, 40.0, 2) == [
        "sampling: 1/2 blocks, 1.5 blocks/min, ETA 40 s",
        "sampling: 2/2 blocks, 1.5 blocks/min, done in 80 s",
    ]


def test_fast_stage_reads_per_second(monkeypatch, capsys):
    assert _lines(monkeypatch, capsys, 0.25, 2) == [
        "sampling: 1/2 blocks, 4.0 blocks/s, ETA 0 s",
        "sampling: 2/2 blocks, 4.0 blocks/s, done in 0 s",
    ]
