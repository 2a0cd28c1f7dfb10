"""The in-process geometry demo (`jobs.geometry`, which makes RESULTS.md's tables) runs end to end: its tables
have a row per data set and method, its figures are written, and its W2 floors are real distances."""

import json

from jobs import geometry


def test_the_geometry_demo_runs_and_reports(tmp_path, capsys):
    out = geometry.main(
        [
            "--seeds",
            "0,1",
            "--rfm-steps",
            "20",
            "--am-steps",
            "10",
            "--n",
            "100",
            "--repeats",
            "2",
            "--hidden",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1])["figures"] == out["figures"]
    assert "| vmf-mixture | S^2 | 2 |" in printed and "| dihedral | T^2 | 2 |" in printed
    for name in geometry.AM_METHODS:
        assert f"| {name} | 2 |" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["am_transport.png", "rfm_dihedral.png", "rfm_vmf-mixture.png"]
    for r in out["rfm"]:
        assert r["w2_floor"] > 0 and r["likelihood_nfe"] > 0 and r["sample_nfe"] == 200
    for r in out["am"]:
        assert len(r["w2"]) == 5 and all(f > 0 for f in r["w2_floor"]) and r["nfe"] == 4 * 20 * 4
    # the entropies are the exact densities' Monte Carlo means
    assert abs(out["entropies"]["vmf-mixture"][0] - 0.831) < 0.01
