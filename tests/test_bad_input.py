"""Bad input ends with a message that names the file, key or row and what is allowed, exit status 2, no traceback,
and before Ray starts."""

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_helpers import before_ray, free_port, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _fails(main, args, message, capsys):
    """Run a job's main in process: exit status 2, the message on stderr, and no Ray work (`before_ray`: it holds
    whether or not the session's Ray is up)."""
    with before_ray(), pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    return err


def test_bad_sources(tmp_path, capsys):
    from jobs.ingest import main

    png = (ROOT / "docs" / "reproduce-digits-nfe-vs-fd.png").read_bytes()
    pq.write_table(pa.table({"img": [{"bytes": png, "path": "a.png"}], "label": ["cat"]}), tmp_path / "s.parquet")
    _fails(
        main,
        ["--source", f"parquet:{tmp_path}/s.parquet", "--out", str(tmp_path / "o")],
        "s.parquet: column 'label' holds string; labels must be integer class indices",
        capsys,
    )
    np.savez(tmp_path / "flat.npz", images=np.zeros((10, 64), np.uint8), labels=np.zeros(10, int))
    _fails(
        main,
        ["--source", f"npz:{tmp_path}/flat.npz", "--out", str(tmp_path / "o")],
        "flat.npz: array 'images' has shape [10, 64]; images must be [N, H, W] or [N, H, W, C]",
        capsys,
    )
    _fails(
        main,
        ["--source", "digits", "--out", str(tmp_path / "o"), "--transform", "center-crop"],
        "--transform center-crop needs --resolution N (the size to resize to)",
        capsys,
    )
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    _fails(
        main,
        ["--source", f"tar:{tmp_path}/bad.tar", "--out", str(tmp_path / "o")],
        "bad.tar: not a readable tar archive",
        capsys,
    )
    (tmp_path / "inet").mkdir()
    (tmp_path / "inet" / "val_data").write_bytes(b"\x80\x04\x95 a pickle")
    _fails(
        main,
        ["--source", f"imagenet:{tmp_path}/inet", "--out", str(tmp_path / "o")],
        "val_data: not an .npz archive (the pickled release cannot be read safely)",
        capsys,
    )
    (tmp_path / "afile").write_text("x")
    _fails(
        main,
        ["--source", "digits", "--out", str(tmp_path / "afile")],
        f"--out: {tmp_path / 'afile'} is a file; a directory is needed",
        capsys,
    )


def test_bad_configs(tmp_path, digits, capsys):
    from jobs.train import main

    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    _fails(main, ["--config", str(tmp_path / "bad.yaml")], "bad.yaml: not a YAML file", capsys)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    _fails(main, ["--config", str(tmp_path / "bin.yaml")], "bin.yaml: not a YAML file", capsys)
    _fails(main, ["--set", "train.steps=[1"], "train.steps: '[1' is not a valid value", capsys)
    sets = ["--config", "configs/digits-cpu.yaml", "--set", f"data.shards={digits}"]
    (tmp_path / "file").write_text("x")
    _fails(
        main,
        [*sets, "--set", f"train.storage_path={tmp_path / 'file'}"],
        f"train.storage_path: {tmp_path / 'file'} is a file; a directory is needed",
        capsys,
    )
    start = time.perf_counter()
    _fails(
        main,
        [
            *sets,
            "--set",
            f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
            "--set",
            f"train.storage_path={tmp_path / 'runs'}",
        ],
        "mlflow.tracking_uri: the MLflow server at http://127.0.0.1:",
        capsys,
    )
    assert time.perf_counter() - start < 10
    runs = ["--set", f"train.storage_path={tmp_path / 'runs'}"]
    # sizes no process of this machine could hold, refused with the estimate before Ray starts
    _fails(
        main,
        [*sets, *runs, "--set", "data.buffer_batches=1000000000"],
        "train.batch_size=64: one Train worker would hold about ",
        capsys,
    )
    from jobs.sample import main as sample

    _fails(
        sample,
        [
            "--checkpoint",
            str(make_checkpoint(tmp_path / "ckpt")),
            "--num-samples",
            "1000000000",
            "--out",
            str(tmp_path / "s"),
            "--no-mlflow",
            "--set",
            "block_size=100000000",
        ],
        "sample.block_size=100000000: one Sampler call would hold about ",
        capsys,
    )
    from jobs.evaluate import main as evaluate

    _fails(
        evaluate,
        ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(digits), "--no-mlflow", "--set", "batch_size=100000000"],
        "eval.batch_size=100000000: one likelihood call would hold about ",
        capsys,
    )
    _fails(
        main,
        [*sets, *runs, "--set", "mlflow.tracking_uri=ftp://127.0.0.1/mlflow"],
        "mlflow.tracking_uri: 'ftp://127.0.0.1/mlflow' has the scheme 'ftp', which MLflow has no tracking store "
        "for; allowed: http, https, sqlite, file, postgresql, mysql, mssql, databricks",
        capsys,
    )
    _fails(
        main,
        [*sets, *runs, "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/no/such/dir/m.db"],
        f"the folder of the sqlite database {tmp_path}/no/such/dir/m.db does not exist",
        capsys,
    )
    with _http_server(500) as url:  # something listens, but it is not MLflow
        _fails(
            main,
            [*sets, *runs, "--set", f"mlflow.tracking_uri={url}"],
            f"mlflow.tracking_uri: the server at {url} answers HTTP 500 (Internal Server Error) to /health; "
            "is it an MLflow tracking server",
            capsys,
        )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "",
            "is empty; a config maps sections (data, model, method, optim, train, ray, mlflow) to keys. Omit --config",
        ),
        ("# only a comment\n", "is empty; a config maps sections"),
        (
            "steps: 10\n",
            "'steps' is not a section; allowed: data, model, method, optim, train, ray, mlflow (every key "
            "goes under its section",
        ),
        (
            "- train\n",
            "top level must be a mapping of sections (data, model, method, optim, train, ray, mlflow); got a list",
        ),
        ("train:\n", "section 'train' is empty; give its keys or remove it"),
    ],
)
def test_config_files_without_sections(tmp_path, capsys, text, message):
    from jobs.train import main

    (tmp_path / "c.yaml").write_text(text)
    err = _fails(main, ["--config", str(tmp_path / "c.yaml")], message, capsys)
    assert str(tmp_path / "c.yaml") in err


@contextlib.contextmanager
def _http_server(status: int):
    """A real HTTP server on 127.0.0.1 that answers every GET with `status`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(status)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_damaged_data(tmp_path, digits, capsys):

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
    manifest["splits"]["train"]["shards"][0]["rows"] -= 1
    # another shape of the same bytes per row (8x8x1 -> 4x4x4): the shards say what they hold
    (data / "manifest.json").write_text(json.dumps({**manifest, "shape": [4, 4, 4]}))
    _fails(main, sets, f"{shard}: the shard holds shape [8, 8, 1], but manifest.json says [4, 4, 4]", capsys)
    (data / "manifest.json").write_text(json.dumps({**manifest, "kind": "points", "shape": [16]}))
    _fails(main, sets, "the shard holds kind 'image', but manifest.json says 'points'", capsys)
    # a shard of the test split listed under train
    test_file = manifest["splits"]["test"]["shards"][0]
    edited = json.loads(json.dumps(manifest))
    edited["splits"]["train"]["shards"][0] = test_file
    (data / "manifest.json").write_text(json.dumps(edited))
    _fails(main, sets, "the shard holds split 'test', but manifest.json says 'train'", capsys)
    # a shard from before the row format was recorded
    pq.write_table(pq.read_table(shard).replace_schema_metadata(None), shard)
    manifest["splits"]["train"]["shards"][0]["rows"] = pq.read_metadata(shard).num_rows
    (data / "manifest.json").write_text(json.dumps(manifest))
    _fails(main, sets, f"{shard}: the shard records no row format", capsys)


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
    _fails(
        main,
        ["--checkpoint", str(ckpt), "--num-samples", "4", "--out", str(tmp_path / "o2"), "--no-mlflow"],
        f"--out: {tmp_path / 'o2'} is a file; a directory is needed",
        capsys,
    )


def test_cli_in_a_fresh_process_prints_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "bad.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "not a YAML file" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: mode 0555, and for root (whom modes do not stop) the immutable
    attribute as well."""
    import os

    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without the immutable attribute (chattr +i)")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    d.chmod(0o755)


def test_read_only_directories(read_only_dir, digits, tmp_path, capsys):
    from jobs.ingest import main as ingest_main
    from jobs.sample import main as sample_main
    from jobs.train import main as train_main

    _fails(
        ingest_main,
        ["--source", "digits", "--out", str(read_only_dir)],
        f"--out: cannot write to {read_only_dir} (",
        capsys,
    )
    _fails(
        sample_main,
        [
            "--checkpoint",
            str(make_checkpoint(tmp_path / "ckpt")),
            "--num-samples",
            "4",
            "--out",
            str(read_only_dir / "samples"),
            "--no-mlflow",
        ],
        f"--out: cannot write to {read_only_dir / 'samples'} (",
        capsys,
    )
    _fails(
        train_main,
        [
            "--config",
            "configs/digits-cpu.yaml",
            "--set",
            f"data.shards={digits}",
            "--set",
            f"train.storage_path={read_only_dir}",
        ],
        f"train.storage_path: cannot write to {read_only_dir} (",
        capsys,
    )


def test_a_corrupt_model_file_is_named_before_ray(tmp_path, capsys):
    from jobs.sample import main

    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.pt").write_bytes(b"PK\x03\x04 not a torch file")
    _fails(
        main,
        ["--checkpoint", str(ckpt), "--num-samples", "4", "--out", str(tmp_path / "o"), "--no-mlflow"],
        "model.pt: not a readable torch file (truncated or corrupt)",
        capsys,
    )


def test_damaged_sample_shards(tmp_path, digits, capsys):
    """A truncated block of a sampling output is named, with the rerun that redoes it, before Ray starts."""
    from jobs.evaluate import main
    from pipelines.core.samples import SAMPLE_SCHEMA, SETTINGS

    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "samples with spaces ü"  # unicode and spaces in a path are named as they are
    out.mkdir()
    (out / SETTINGS).write_text("{}")
    rows = {"id": [0, 1], "seed": [0, 0], "label": [-1, -1], "nfe": [2, 2], "image": [bytes(64), bytes(64)]}
    for block in (0, 1):
        pq.write_table(pa.table(rows, schema=SAMPLE_SCHEMA), out / f"block-{block:08d}.parquet")
    damaged = out / "block-00000001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    err = _fails(
        main,
        ["--checkpoint", str(ckpt), "--data", str(digits), "--samples", str(out), "--no-mlflow"],
        f"{damaged}: not a readable sample shard (truncated or corrupt: ",
        capsys,
    )
    assert f"rerun the sampling job with --out {out}: it redoes every block that does not read back whole" in err
    assert "ArrowInvalid" not in err


NAME_RULE = "is not allowed; a name must be one path component: 1 to 128 characters, no '/' '\\\\'"


def test_a_name_is_one_path_component():
    from pipelines.core.errors import ConfigError
    from pipelines.core.storage import check_name

    for good in ("digits-cpu", "sweep-optim.lr=1e-3-s0", "...", "x" * 128, "ünï"):
        assert check_name(good, "k") == good
    for bad in ("", ".", "..", "a/b", "a\\b", "tab\there", "nl\n", "del\x7f", " lead", "trail ", "x" * 129, None):
        with pytest.raises(ConfigError, match=r"^k: .* is not allowed; a name must be one path component"):
            check_name(bad, "k")
    with pytest.raises(ConfigError, match=r"no '/' '\\\\' ':'"):
        check_name("a:b", "k", also=":")


@pytest.mark.parametrize("bad", ["..", "a/b"])
def test_every_name_that_becomes_a_path_stays_in_its_folder(bad, tmp_path, digits, capsys):
    """Run, sweep, chain, experiment and registered-model names: one path component, checked before anything is
    written (nothing appears beside or above the storage folder)."""
    from jobs.reflow import main as reflow
    from jobs.reflow_study import main as study
    from jobs.reproduce import main as reproduce
    from jobs.sweep import main as sweep
    from jobs.train import main as train

    store = tmp_path / "store" / "inner"
    sets = [
        "--config",
        "configs/digits-cpu.yaml",
        "--set",
        f"data.shards={digits}",
        "--set",
        f"train.storage_path={store}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    _fails(train, [*sets, "--set", f"train.run_name={bad}"], f"train.run_name: {bad!r} {NAME_RULE}", capsys)
    _fails(train, [*sets, "--set", f"mlflow.experiment={bad}"], f"mlflow.experiment: {bad!r} {NAME_RULE}", capsys)
    _fails(train, [*sets, "--set", f"mlflow.register_as={bad}"], f"mlflow.register_as: {bad!r} {NAME_RULE}", capsys)
    _fails(
        train,
        [*sets, "--set", "mlflow.register_as=digits", "--set", "mlflow.log_model=false"],
        "mlflow.register_as: 'digits' is not allowed; needs mlflow.log_model=true: the registry holds the MLflow Model",
        capsys,
    )
    _fails(sweep, [*sets, "--name", bad, "--param", "optim.lr=1e-3"], f"--name: {bad!r} {NAME_RULE}", capsys)
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    _fails(
        reflow,
        ["--checkpoint", ckpt, "--data", str(digits), "--num-pairs", "64", "--name", bad, "--out", str(store)],
        f"--name: {bad!r} {NAME_RULE}",
        capsys,
    )
    _fails(study, ["--name", bad, "--out", str(store)], f"--name: {bad!r} {NAME_RULE}", capsys)
    _fails(reproduce, ["--experiment", bad, "--out", str(store)], f"--experiment: {bad!r} {NAME_RULE}", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no store, no database, nothing else


def test_a_hostile_registry_uri_deletes_nothing(tmp_path, capsys, monkeypatch):
    """`models:/..` once emptied outputs/checkpoints (the cache's rmtree ran on a path built from the URI)."""
    from jobs.sample import main

    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "outputs" / "checkpoints" / "keep-me"
    sentinel.parent.mkdir(parents=True)
    sentinel.write_text("a file the job did not write")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for spec, message in [
        (
            "models:/..",
            "--checkpoint: 'models:/..' is not a registered model URI; expected models:/NAME/VERSION or "
            "models:/NAME@ALIAS",
        ),
        ("models:/../1", f"--checkpoint (registered model name): '..' {NAME_RULE}"),
        ("models:/x/..", f"--checkpoint (version): '..' {NAME_RULE}"),
        ("models:/..@..", f"--checkpoint (registered model name): '..' {NAME_RULE}"),
        ("models:/x@..", f"--checkpoint (alias): '..' {NAME_RULE}"),
        ("runs:/..", f"--checkpoint (run id): '..' {NAME_RULE}"),
    ]:
        _fails(
            main,
            ["--checkpoint", spec, "--num-samples", "4", "--out", str(tmp_path / "s"), "--tracking-uri", uri],
            message,
            capsys,
        )
    assert sentinel.read_text() == "a file the job did not write"
    assert sorted(p.name for p in (tmp_path / "outputs" / "checkpoints").iterdir()) == ["keep-me"]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("reproduce", ["--seeds", "0,,1"], "argument --seeds: '0,,1' is not a comma-separated list of integers"),
        (
            "reproduce",
            ["--euler-steps", "two"],
            "argument --euler-steps: 'two' is not a comma-separated list of integers",
        ),
        ("reproduce", ["--methods", "fm_ot,"], "argument --methods: 'fm_ot,' has an empty item"),
        ("reflow_study", ["--seeds", ""], "argument --seeds: '' is not a comma-separated list of integers"),
        (
            "sweep",
            ["--name", "s", "--seeds", "1.5"],
            "argument --seeds: '1.5' is not a comma-separated list of integers",
        ),
        ("geometry", ["--seeds", "x"], "argument --seeds: 'x' is not a comma-separated list of integers"),
    ],
)
def test_every_job_s_list_flags_are_checked(module, args, message, capsys):
    import importlib

    job = importlib.import_module(f"jobs.{module}")
    _fails(job.main if hasattr(job, "main") else job.parse_args, args, message, capsys)


def test_places_and_resources_that_cannot_work_are_refused_in_words(tmp_path, digits, capsys):
    from jobs.train import main

    sets = [
        "--config",
        "configs/digits-cpu.yaml",
        "--set",
        f"data.shards={digits}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    runs = [*sets, "--set", f"train.storage_path={tmp_path / 'runs'}"]
    # an object-store URI with one slash would have become a local folder named 's3:'
    _fails(
        main,
        [*sets, "--set", "train.storage_path=s3:/bucket/runs"],
        "train.storage_path: 's3:/bucket/runs' is not a URI: an object-store URI is written s3://bucket/path",
        capsys,
    )
    assert not (ROOT / "s3:").exists()
    # an MLflow store that is not a database
    (tmp_path / "notes.db").write_text("my notes, not a database")
    _fails(
        main,
        [*runs, "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'notes.db'}"],
        f"mlflow.tracking_uri: {tmp_path / 'notes.db'} is not a sqlite database (its first bytes are b'my notes, no')",
        capsys,
    )
    assert (tmp_path / "notes.db").read_text() == "my notes, not a database"
    # more than this machine's local Ray has, and a GPU that is not there
    _fails(
        main,
        [*runs, "--set", "ray.num_workers=8"],
        "ray.num_workers=8, ray.cpus_per_worker=0.5, ray.use_gpu=False: 8 Train worker(s) ask for 4 CPU and the "
        "work beside them 0.25 CPU in all, but this machine's local Ray (4 logical CPUs: ray.local_cpus=4 on",
        capsys,
    )
    import torch

    if not torch.cuda.is_available():
        _fails(
            main,
            [*runs, "--set", "ray.use_gpu=true", "--set", "ray.num_workers=1"],
            "each Train worker asks for 0.5 CPU, 1 GPU, which no node of this machine's local Ray",
            capsys,
        )
    # a cluster address where nothing listens: named within ray.address's wait, no MLflow run left behind
    start = time.perf_counter()
    _fails(
        main,
        [*runs, "--set", f"ray.address=127.0.0.1:{free_port()}"],
        "ray.address: nothing accepts a connection at 127.0.0.1:",
        capsys,
    )
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "m.db").exists() or _runs(f"sqlite:///{tmp_path / 'm.db'}") == []


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_an_actor_no_node_can_hold_is_refused_before_the_stage(tmp_path, capsys, ray_local):
    from jobs.sample import main

    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    err = _fails_with_ray(
        main,
        [
            "--checkpoint",
            ckpt,
            "--num-samples",
            "4",
            "--out",
            str(tmp_path / "o"),
            "--no-mlflow",
            "--set",
            "sample.cpus_per_actor=64",
        ],
        capsys,
    )
    assert (
        "sample.actors=0, sample.cpus_per_actor=64, sample.gpus_per_actor=0: each actor asks for 64 CPU, which "
        "no node of this Ray's 1 node(s)" in err
    ), err


def _fails_with_ray(main, args, capsys) -> str:
    """Like `_fails`, for a stage refused once Ray is up (the module's Ray serves it)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err


def test_checkpoints_whose_meta_does_not_describe_their_weights(tmp_path, digits, capsys):
    from types import SimpleNamespace

    from ray.train import Checkpoint

    from jobs.train import main
    from pipelines.core.checkpoint import CheckpointError
    from pipelines.train.driver import _resume_meta

    other = make_checkpoint(tmp_path / "other", model_channels=16)  # a 16-channel UNet whose meta.json says 8
    (other / "meta.json").write_text(
        (other / "meta.json").read_text().replace('"model_channels": 16', '"model_channels": 8')
    )
    _fails(
        main,
        [
            "--config",
            "configs/digits-cpu.yaml",
            "--set",
            f"data.shards={digits}",
            "--set",
            f"train.storage_path={tmp_path / 'runs'}",
            "--set",
            "model.model_channels=8",
            "--set",
            "model.num_heads=1",
            "--set",
            "model.attention_resolutions=[]",
            "--set",
            f"train.init_from={other}",
        ],
        f"train.init_from: checkpoint {other}: weights do not fit model unet",
        capsys,
    )
    # the checkpoint a run would resume from: refused before Ray, not after the workers' retries
    previous = SimpleNamespace(checkpoint=Checkpoint.from_directory(str(other)))
    with pytest.raises(CheckpointError, match="weights do not fit model unet"):
        _resume_meta(previous)


@pytest.mark.parametrize("what", ["an object store that does not answer", "a cluster address that does not"])
def test_a_signal_ends_a_bounded_wait_at_once(what, tmp_path, digits):
    """SIGTERM during a storage probe of a gs:// path with no credentials or network, and during the wait for a
    cluster address where nothing listens: the job ends within seconds with one line and status 143."""
    import signal

    setting = (
        "train.storage_path=gs://flowray-nowhere/runs" if "object" in what else f"ray.address=127.0.0.1:{free_port()}"
    )
    cmd = [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        "configs/digits-cpu.yaml",
        "--set",
        f"data.shards={digits}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "--set",
        setting,
    ]
    if "object" not in what:
        cmd += ["--set", f"train.storage_path={tmp_path / 'runs'}"]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("GOOGLE_", "RAY_ADDRESS"))}
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(6)  # imports and config checks done: in the wait
    assert job.poll() is None, job.communicate()[1][-2000:]
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 143 and time.monotonic() - sent < 5, err[-2000:]
    assert err.strip().splitlines()[-1] == "training stopped by SIGTERM; rerun the same command to resume", err
    assert "Traceback" not in err
