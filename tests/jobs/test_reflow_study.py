"""`flowray reflow-study`: its flags refused in words, and its table's mean ± std over seeds (no Ray: the chain it
calls is tested in tests/pipelines/test_reflow_pipeline.py)."""

import pytest

from jobs.reflow_study import markdown, parse


def _figures(seed, fd1, fd2, nfe, s, bpd, **extra):
    return {
        "seed": seed,
        "train_s": 1.0,
        "fd_label": "FD (digits classifier)",
        "fd_floor": 0.25,
        "fd": {"euler1": fd1, "dopri5": fd2},
        "fd_matched": {"euler1": fd1 + 1, "dopri5": fd2 + 0.5},
        "num_matched": 170,
        "nfe": {"euler1": 1, "dopri5": nfe},
        "straightness": s,
        "bpd": bpd,
        **extra,
    }


def test_the_table_gives_mean_and_sample_std_over_seeds_and_the_pairs_cost():
    a = parse(["--seeds", "0,1", "--solvers", "euler:1,dopri5", "--num-pairs", "100"])
    rows = {
        "otcfm (uniform t)": [_figures(0, 10.0, 2.0, 100, 0.5, 5.0), _figures(1, 12.0, 4.0, 110, 0.7, 5.5)],
        "reflow of otcfm": [
            _figures(
                0, 3.0, 2.5, 40, 0.1, 5.2, pairs_per_s=50.0, pairs_wall_s=2.0, pairs_and_ingest_s=5.0, pairs_nfe=98.0
            )
        ],
    }
    table = markdown(rows, ["euler:1", "dopri5"], a).splitlines()
    assert table[0] == (
        "| model | FD (digits classifier) euler:1 | FD (digits classifier) dopri5 | NFE (dopri5) | "
        "straightness | bits/dim | seeds |"
    )
    # std over the two seeds with n - 1: |10 - 12| / sqrt(2) = 1.41
    assert table[2] == (
        "| otcfm (uniform t) | 11.00 ± 1.41 | 3.00 ± 1.41 | 105 ± 7 | 0.6 ± 0.141 | 5.250 ± 0.354 | 2 |"
    )
    assert table[3] == "| reflow of otcfm | 3.00 | 2.50 | 40 | 0.1 | 5.200 | 1 |"
    assert "FD (digits classifier) floor (held-out real images against the reference): 0.250" in table
    # each FD again at the floor's image count, beside the floor: the comparison a Fréchet distance allows
    at = table.index(
        "At the floor's count (170 samples against the reference, as the floor's 170 held-out images are):"
    )
    assert table[at + 2 : at + 6] == [
        "| model | FD (digits classifier) euler:1 | FD (digits classifier) dopri5 | floor |",
        "| --- | --- | --- | --- |",
        "| otcfm (uniform t) | 12.00 ± 1.41 | 3.50 ± 1.41 | 0.250 ± 0.000 |",
        "| reflow of otcfm | 4.00 | 3.00 | 0.250 |",
    ]
    assert table[-1] == (
        "Pairs (dopri5, 100 per reflow): 50.0 samples/s on the batch stage, 2 s sampling, 5 s with "
        "ingest, mean NFE 98; training 600 steps in all per row (reflow rows: 300 + 300)."
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--methods", "icfm,otcfm:cosine"],
            "--methods: otcfm:cosine: unknown time sampling; allowed: uniform, logit_normal",
        ),
        (
            ["--methods", "icfm", "--reflow-from", "otcfm"],
            "--reflow-from: 'otcfm' is not one of --methods' uniform-time",
        ),
        (["--steps", "300", "--reflow-at", "300"], "--reflow-at: 300 must be between 0 and --steps (300), exclusive"),
        (
            ["--methods", "otcfm,meanflow", "--solvers", "dopri5"],
            "--solvers: 'dopri5' has no fixed-step solver (SOLVER:STEPS) for meanflow, which samples in jumps",
        ),
        (
            ["--distill", "--solvers", "euler:2,dopri5"],
            "--solvers: 'euler:2,dopri5' has no one-step column (e.g. euler:1) for the distilled one-step maps",
        ),
    ],
)
def test_bad_flags_are_refused_in_words(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_models_sampled_in_jumps_take_the_columns_with_as_many_network_calls():
    from jobs.reflow_study import columns_of
    from pipelines.reflow import solves_from

    solves = solves_from("euler:1,euler:2,dopri5", 10)
    columns, own = columns_of("otcfm", solves)
    assert columns == ["euler1", "euler2", "dopri5"] and own == solves
    columns, own = columns_of("meanflow", solves)  # k jumps where Euler takes k steps; no adaptive column
    assert columns == ["euler1", "euler2"] and [(s.solver, s.steps) for s in own] == [("jump", 1), ("jump", 2)]
    columns, own = columns_of("distill", solves)  # a one-step map: its one jump only
    assert columns == ["euler1"] and [(s.solver, s.steps) for s in own] == [("jump", 1)]

    a = parse(["--seeds", "0", "--solvers", "euler:1,dopri5", "--num-pairs", "100", "--distill"])
    jump = _figures(0, 7.0, 0.0, None, None, None)
    for key in ("fd", "fd_matched", "nfe"):
        del jump[key]["dopri5"]
    rows = {
        "otcfm (uniform t)": [_figures(0, 10.0, 2.0, 100, 0.5, 5.0)],
        "distilled reflow of otcfm": [
            {**jump, "pairs_per_s": 50.0, "pairs_wall_s": 2.0, "pairs_and_ingest_s": 5.0, "pairs_nfe": 98.0}
        ],
    }
    table = markdown(rows, ["euler:1", "dopri5"], a).splitlines()
    assert table[3] == "| distilled reflow of otcfm | 7.00 | – | – | – | – | 1 |"
    assert table[-1].endswith("training 600 steps in all per row (reflow rows: 300 + 300; distilled rows 300 more).")


def test_a_stopped_study_keeps_its_finished_rows_and_refuses_other_settings(tmp_path):
    from jobs.reflow_study import kept_row, load_rows, row_order, save_rows
    from pipelines.core.errors import ConfigError

    argv = ["--methods", "otcfm,meanflow,otcfm:logit_normal", "--distill", "--seeds", "0,1", "--num-pairs", "100"]
    a = parse(argv)
    assert row_order(a) == [
        "otcfm (uniform t)",
        "reflow of otcfm",
        "distilled reflow of otcfm",
        "meanflow (uniform t)",
        "otcfm (logit_normal t)",
    ]
    assert load_rows(tmp_path, a) == {}  # a new study
    rows = {"otcfm (uniform t)": [_figures(0, 10.0, 2.0, 100, 0.5, 5.0)]}
    save_rows(tmp_path, a, rows)
    assert not (tmp_path / "rows.json.tmp").exists()
    # the same flags (other methods and seeds too) read the finished rows back, each seed's figures whole
    again = load_rows(tmp_path, parse([*argv[:-2], "--seeds", "0,1,2", "--num-pairs", "100"]))
    assert kept_row(again, "otcfm (uniform t)", 0) == rows["otcfm (uniform t)"][0]
    assert kept_row(again, "otcfm (uniform t)", 1) is None and kept_row(again, "reflow of otcfm", 0) is None
    # figures measured otherwise would not compare: refused, naming the flags that differ
    with pytest.raises(ConfigError) as e:
        load_rows(tmp_path, parse([*argv, "--steps", "800", "--set", "train.lr=3e-4"]))
    assert str(e.value) == (
        f"reflow study 'reflow-study' at {tmp_path} has rows measured with --steps 600, --set []; rerun it "
        "with the same flags to continue it, or give a new --name"
    )
