"""A registered model version that describes itself: what training says of it, the latest evaluation's figures as
tags, and `flowray compare --models NAME` listing the versions (a real sqlite-backed MLflow registry)."""

import json

from mlflow.tracking import MlflowClient
from pipeline_helpers import make_checkpoint

from pipelines.core.checkpoint import load_model
from pipelines.core.registry import describe_model_version, tag_model_version


def test_a_version_carries_its_description_and_latest_evaluation(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = make_checkpoint(tmp_path / "ckpt", method="otcfm")
    client = MlflowClient(uri)
    client.create_registered_model("tiny")
    for _ in range(2):
        client.create_model_version("tiny", source=str(ckpt))
    data = {"name": "digits/train", "digest": "0123456789abcdef", "profile": {"num_rows": 1627}}
    describe_model_version(uri, "tiny", "2", str(ckpt), data)
    v = client.get_model_version("tiny", "2")
    size = sum(p.numel() for p in load_model(ckpt).model.parameters())
    assert v.description == (
        f"otcfm: straight line path, exact OT coupling; a unet of {size:,} "
        "parameters trained 1 steps on digits/train (1627 rows, digest 0123456789abcdef)."
    )
    assert v.tags["flowray.method"] == "otcfm" and v.tags["flowray.data_digest"] == "0123456789abcdef"
    assert v.tags["flowray.train_steps"] == "1" and v.tags["flowray.parameters"] == str(size)

    client.set_registered_model_alias("tiny", "best", "2")
    headline = {"bpd": 4.88, "fd_label": "FD (digits classifier)", "fd": 1.83, "fd_floor": 2.2, "fid": None}
    assert tag_model_version(uri, "models:/tiny@best", headline) == "tiny/2"
    assert tag_model_version(uri, str(ckpt), headline) is None  # a plain checkpoint: no version to tag
    tags = client.get_model_version("tiny", "2").tags
    assert (tags["flowray.bpd"], tags["flowray.fd"], tags["flowray.fd_floor"]) == ("4.88", "1.83", "2.2")
    assert "flowray.fid" not in tags  # not measured: not a tag

    from jobs.compare import main

    listed = main(["--models", "tiny", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert [v["version"] for v in listed["versions"]] == [2, 1] and listed["versions"][0]["aliases"] == "best"
    assert "| 2 | best | otcfm |" in out and json.loads(out.strip().splitlines()[-1])["model"] == "tiny"
