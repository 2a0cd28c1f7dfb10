"""Bad input ends with a message that names the file, key or row and what is allowed, exit status 2, no traceback,
and before Ray starts."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_helpers import free_port, make_checkpoint

from pipelines.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def _fails(main, args, message, capsys):
    """Run a job's main in process: exit status 2, the message on stderr, and Ray never started."""
    import ray

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    return err


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    ingest("digits", out, shards=2)
    return out


def test_bad_sources(tmp_path, capsys):
    from jobs.ingest import main

    png = (ROOT / "docs" / "reproduce-digits-nfe-vs-fd.png").read_bytes()
    pq.write_table(pa.table({"img": [{"bytes": png, "path": "a.png"}], "label": ["cat"]}), tmp_path / "s.parquet")
    _fails(main, ["--source", f"parquet:{tmp_path}/s.parquet", "--out", str(tmp_path / "o")],
           "s.parquet: column 'label' holds string; labels must be integer class indices", capsys)
    np.savez(tmp_path / "flat.npz", images=np.zeros((10, 64), np.uint8), labels=np.zeros(10, int))
    _fails(main, ["--source", f"npz:{tmp_path}/flat.npz", "--out", str(tmp_path / "o")],
           "flat.npz: array 'images' has shape [10, 64]; images must be [N, H, W] or [N, H, W, C]", capsys)
    _fails(main, ["--source", "digits", "--out", str(tmp_path / "o"), "--transform", "center-crop"],
           "--transform center-crop needs --resolution N (the size to resize to)", capsys)
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    _fails(main, ["--source", f"tar:{tmp_path}/bad.tar", "--out", str(tmp_path / "o")],
           "bad.tar: not a readable tar archive", capsys)
    (tmp_path / "inet").mkdir()
    (tmp_path / "inet" / "val_data").write_bytes(b"\x80\x04\x95 a pickle")
    _fails(main, ["--source", f"imagenet:{tmp_path}/inet", "--out", str(tmp_path / "o")],
           "val_data: not an .npz archive (the pickled release cannot be read safely)", capsys)
    (tmp_path / "afile").write_text("x")
    _fails(main, ["--source", "digits", "--out", str(tmp_path / "afile")],
           f"--out: {tmp_path / 'afile'} is a file; a directory is needed", capsys)


def test_bad_configs(tmp_path, digits, capsys):
    from jobs.train import main

    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    _fails(main, ["--config", str(tmp_path / "bad.yaml")], "bad.yaml: not a YAML file", capsys)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    _fails(main, ["--config", str(tmp_path / "bin.yaml")], "bin.yaml: not a YAML file", capsys)
    _fails(main, ["--set", "train.steps=[1"], "train.steps: '[1' is not a valid value", capsys)
    sets = ["--config", "configs/digits-cpu.yaml", "--set", f"data.shards={digits}"]
    (tmp_path / "file").write_text("x")
    _fails(main, [*sets, "--set", f"train.storage_path={tmp_path / 'file'}"],
           f"train.storage_path: {tmp_path / 'file'} is a file; a directory is needed", capsys)
    start = time.perf_counter()
    _fails(main, [*sets, "--set", f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
                  "--set", f"train.storage_path={tmp_path / 'runs'}"],
           "mlflow.tracking_uri: the MLflow server at http://127.0.0.1:", capsys)
    assert time.perf_counter() - start < 10


def test_damaged_data(tmp_path, digits, capsys):
    import shutil

    from jobs.train import main

    data = tmp_path / "d"
    shutil.copytree(digits, data)
    sets = ["--config", "configs/digits-cpu.yaml", "--set", f"data.shards={data}"]
    shard = sorted(data.glob("train-*.parquet"))[0]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated: the footer is gone
    _fails(main, sets, f"{shard}: not a readable parquet file (truncated or corrupt", capsys)
    shard.write_bytes(good)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # same size, other checksum
    (data / "manifest.json").write_text(json.dumps(manifest))
    _fails(main, [*sets, "--verify"], f"{shard}: checksum", capsys)
    manifest["splits"]["train"]["shards"][0]["rows"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    _fails(main, sets, "rows, but manifest.json says", capsys)


def test_damaged_checkpoints(tmp_path, capsys):
    from jobs.sample import main

    def sample(ckpt):
        return ["--checkpoint", str(ckpt), "--num-samples", "4", "--out", str(tmp_path / "o"), "--no-mlflow"]

    ckpt = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "file").write_text("x")
    _fails(main, sample(tmp_path / "file"), "is a file; a checkpoint is a directory holding meta.json", capsys)
    meta = (ckpt / "meta.json").read_text()
    (ckpt / "meta.json").write_text(meta[:40])
    _fails(main, sample(ckpt), "meta.json: not valid JSON", capsys)
    (ckpt / "meta.json").write_text(json.dumps({"step": "x", "model": {}, "method": {}}))
    _fails(main, sample(ckpt), "meta.json: key 'step' must be an integer; got 'x'", capsys)
    (ckpt / "meta.json").write_text(meta)
    ema = (ckpt / "ema.pt").read_bytes()
    (ckpt / "ema.pt").write_bytes(ema[: len(ema) // 3])
    _fails(main, sample(ckpt), "ema.pt: not a readable torch file (truncated or corrupt)", capsys)

    class Payload:  # a pickle that would run code on an unsafe load
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"module": Payload()}, ckpt / "ema.pt")
    _fails(main, sample(ckpt), "ema.pt: refused: it holds Python objects other than tensors", capsys)
    (ckpt / "ema.pt").write_bytes(ema)
    (tmp_path / "o2").write_text("x")
    _fails(main, ["--checkpoint", str(ckpt), "--num-samples", "4", "--out", str(tmp_path / "o2"), "--no-mlflow"],
           f"--out: {tmp_path / 'o2'} is a file; a directory is needed", capsys)


def test_cli_in_a_fresh_process_prints_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [")
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "bad.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a YAML file" in out.stderr and "Traceback" not in out.stderr
