"""Evaluation stage on real Ray and MLflow: closed-form bits/dim, classifier-feature metrics, the compare table."""

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from fm.ema import EMA
from fm.models import GaussianOTFlow
from fm.seeding import SeedStack, derive_seed
from pipelines.batch.config import EvalConfig
from pipelines.batch.evaluate import log_evaluation_run, open_evaluation_run, run_evaluation
from pipelines.batch.quality import sample_quality
from pipelines.batch.results import EvaluationError
from pipelines.core.checkpoint import save_checkpoint
from pipelines.core.errors import ConfigError
from pipelines.core.samples import SAMPLE_SCHEMA, SETTINGS, SamplingError
from pipelines.ingest.run import ingest, load_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def gaussian_checkpoint(directory, shape):
    flow = GaussianOTFlow(mu=0.1, std=0.4)
    manifest = {"source": "npz:x", "kind": "image", "shape": shape, "num_classes": 1, "class_names": []}
    return save_checkpoint(
        directory,
        step=0,
        model=flow,
        ema_state=EMA(flow).state_dict(),
        optimizer=None,
        model_name="gaussian_ot",
        model_kwargs={"mu": 0.1, "std": 0.4},
        method_kwargs={"name": "fm_ot", "sigma_min": 0.0},
        config={},
        manifest=manifest,
    )


def test_likelihood_stage_gives_the_closed_form_bits_per_dim(tmp_path, ray_local):
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(140, 25, (40, 4, 4, 1)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "g.npz", images=images, labels=np.zeros(40, dtype=np.int64))
    ingest(f"npz:{tmp_path / 'g.npz'}", tmp_path / "data", shards=2, test_fraction=0.5)
    ckpt = gaussian_checkpoint(tmp_path / "ckpt", [4, 4, 1])
    test = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "data").glob("test-*.parquet"))])
    x = torch.from_numpy(np.frombuffer(b"".join(test["image"].to_pylist()), np.uint8).reshape(-1, 1, 4, 4).copy())
    exact = GaussianOTFlow(mu=0.1, std=0.4).bits_per_dim_exact(x).mean().item()

    cfg = EvalConfig(draws=32, divergence="exact", batch_size=8, actors=2, atol=1e-7, rtol=1e-7)
    evaluated = run_evaluation(str(ckpt), str(tmp_path / "data"), None, cfg)
    res = evaluated.likelihood
    assert res.n == len(x) and res.unit == "bits/dim" and res.draws == 32
    assert res.mean == pytest.approx(exact, abs=5e-3)
    # the evaluation run in MLflow: its figures, and the split it read as its dataset input (lineage)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(log_evaluation_run(evaluated, cfg, uri, open_evaluation_run(uri, str(ckpt))))
    assert run.data.metrics["bpd"] == pytest.approx(res.mean) and evaluated.mlflow_run_id == run.info.run_id
    (read,) = run.inputs.dataset_inputs
    assert (read.dataset.name, read.dataset.digest) == ("npz/test", load_manifest(tmp_path / "data").digest("test"))
    assert [(tag.key, tag.value) for tag in read.tags] == [("mlflow.data.context", "evaluation")]
    assert run.data.tags["mlflow.note.content"] == "likelihood of fm_ot at step 0"
    # every row's value, as an artifact that pairs methods scored on the same rows: rows in order, float64 exact,
    # their mean the logged metric; the job's JSON line stays free of them
    per_row = MlflowClient(uri).download_artifacts(run.info.run_id, "likelihood/bpd_per_row.csv", str(tmp_path))
    lines = open(per_row).read().splitlines()
    assert lines[0] == "row,bpd,nfe" and len(lines) == 1 + res.n
    rows, values, nfes = zip(*[line.split(",") for line in lines[1:]], strict=True)
    assert [int(r) for r in rows] == res.rows == sorted(res.rows)
    assert [float(v) for v in values] == res.values and [float(n) for n in nfes] == res.nfes
    assert np.mean([float(v) for v in values]) == pytest.approx(run.data.metrics["bpd"], rel=1e-12)
    assert "values" not in evaluated.to_dict()["likelihood"]
    # straightness, against the closed form: the flow moves x_0 to x_t = t mu + S_t x_0, S_t^2 = (1 - t)^2 + t^2 std^2,
    # so the chord is mu + (std - 1) x_0 and S = mean(x_0^2) (int S_t'^2 dt - (std - 1)^2); the farthest grid point
    # from the chord is max_k |S_t - (1 - t + t std)| ||x_0|| / ||chord||. Its 64 trajectories start from the noise of
    # derive_seed(eval.seed, 3, i), regenerated here; 16 RK4 steps and the trapezoid rule: within 1%
    st, std = evaluated.straightness, 0.4
    x_0 = SeedStack([derive_seed(0, 3, i) for i in range(64)]).randn([1, 4, 4]).double()
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    S = torch.sqrt((1 - t) ** 2 + t**2 * std**2)
    integral = torch.trapezoid(((t * std**2 - (1 - t)) / S) ** 2, t).item() - (std - 1) ** 2
    assert st.straightness == pytest.approx(x_0.pow(2).mean().item() * integral, rel=1e-2)
    grid = torch.linspace(0, 1, 17, dtype=torch.float64)
    off = (torch.sqrt((1 - grid) ** 2 + grid**2 * std**2) - (1 - grid + grid * std)).abs().max()
    chord = (0.1 + (std - 1) * x_0).flatten(1).norm(dim=1)
    assert st.chord_deviation == pytest.approx((off * x_0.flatten(1).norm(dim=1) / chord).mean().item(), rel=1e-2)
    assert (st.samples, st.steps, st.nfe) == (64, 16, 16 * 4 + 17)
    assert run.data.metrics["straightness"] == pytest.approx(st.straightness, rel=1e-6)
    assert run.data.tags["flowray.straightness"] == "64 trajectories, 16 RK4 steps"
    # Hutchinson with one Gaussian probe is noisy per image but unbiased for the one-draw bound: its mean
    # agrees with the exact divergence's within its standard error (same dequantization noise, K = 1)
    one = dict(draws=1, batch_size=8, atol=1e-7, rtol=1e-7)
    exact_1 = run_evaluation(str(ckpt), str(tmp_path / "data"), None, EvalConfig(divergence="exact", **one)).likelihood
    hutch = run_evaluation(
        str(ckpt),
        str(tmp_path / "data"),
        None,
        EvalConfig(divergence="hutchinson", probes=1, probe_kind="gaussian", **one),
    ).likelihood
    assert abs(hutch.mean - exact_1.mean) < 3 * hutch.stderr
    assert hutch.stderr > exact_1.stderr


def test_per_image_bits_per_dim_do_not_depend_on_actors_or_blocks_per_call(tmp_path, ray_local):
    from pipelines.batch.evaluate import likelihood_rows, likelihood_values

    rng = np.random.default_rng(1)
    images = np.clip(rng.normal(140, 25, (80, 4, 4, 1)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "g.npz", images=images, labels=np.zeros(80, dtype=np.int64))
    ingest(f"npz:{tmp_path / 'g.npz'}", tmp_path / "data", shards=3, test_fraction=0.5)
    manifest = load_manifest(tmp_path / "data")
    ckpt = str(gaussian_checkpoint(tmp_path / "ckpt", [4, 4, 1]))
    base = EvalConfig(max_images=29, batch_size=4, divergence="hutchinson", probes=2, seed=5)
    rows, ref, _, _ = likelihood_values(ckpt, manifest, replace(base, actors=1, blocks_per_call=1))
    # max_images: a uniform draw over the whole split from the seed, in row order
    assert rows.tolist() == likelihood_rows(manifest.count("test"), 29, 5).tolist() == sorted(set(rows.tolist()))
    assert rows.max() > 29  # not simply the first rows
    again_rows, again, _, _ = likelihood_values(ckpt, manifest, replace(base, actors=2, blocks_per_call=3))
    assert np.array_equal(again_rows, rows) and np.array_equal(again, ref)


def _fake_samples(directory, images: np.ndarray, checkpoint):
    directory.mkdir(parents=True)
    n = len(images)
    table = pa.table(
        {
            "id": np.arange(n),
            "seed": np.arange(n),
            "label": np.full(n, -1),
            "nfe": np.full(n, 1),
            "image": [im.tobytes() for im in images],
        },
        schema=SAMPLE_SCHEMA,
    )
    pq.write_table(table, directory / "block-00000000.parquet")
    (directory / SETTINGS).write_text(f'{{"checkpoint": "{checkpoint}", "solver": "euler", "steps": 1}}')


def test_auto_actor_pools_fill_the_cores_within_the_memory_resource(ray_local):
    import os

    import ray

    from pipelines.core.runtime import actor_pool

    cores = os.cpu_count()
    # one actor per core its threads take (a local Ray's logical CPUs are more than its cores: not counted)
    assert actor_pool(0, 0.5)[0] == cores and actor_pool(0, 1.0)[0] == cores
    assert actor_pool(0, 2.0)[0] == max(1, cores // 2)
    node_cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(
        ConfigError,
        match=rf"each actor asks for {4 * cores} CPU, which no node of this Ray's 1 "
        rf"node\(s\) \({node_cpus:g} CPU, 0 GPU\) has",
    ):
        actor_pool(0, 4 * cores)  # no node could place it: refused, rather than waited for for ever
    assert actor_pool(3, 0.5, memory=1 << 30) == (3, 1 << 30)  # a set count is kept, the memory declared
    memory = ray.available_resources()["memory"]
    assert actor_pool(0, 0.5, memory=int(memory / 1.5))[0] == 1  # as many as the memory resource holds
    # more than any node has: declared as the node's whole memory resource (Ray would wait forever for more)
    node_memory = int(max(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"]))
    assert actor_pool(0, 0.5, memory=2 * node_memory) == (1, node_memory)
    if not ray.cluster_resources().get("GPU"):  # GPU actors where no node has a GPU: refused, not waited for
        with pytest.raises(ConfigError, match=r"each actor asks for 0.5 CPU, 1 GPU, which no node"):
            actor_pool(0, 0.5, gpus=1.0)
    assert actor_pool(0, 0.5, work=1)[0] == 1 and actor_pool(3, 0.5, work=1)[0] == 3  # auto: no idle actors


@pytest.mark.heavy  # about 5 minutes on an AVX2-only 2-core machine: `make heavy`, which CI runs
def test_classifier_features_rank_real_above_noise(tmp_path, ray_local):
    from fm.metrics import gaussian_stats
    from pipelines.batch.features import extract, feature_stage, in_subset, load_network, split_stats
    from pipelines.batch.quality import feature_net

    data = tmp_path / "digits"
    ingest("digits", data, shards=2, test_fraction=0.2)
    test = pa.concat_tables([pq.read_table(p) for p in sorted(data.glob("test-*.parquet"))])
    real = np.frombuffer(b"".join(test["image"].to_pylist()[:300]), np.uint8).reshape(-1, 8, 8, 1)
    noise = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    _fake_samples(tmp_path / "real", real, tmp_path)
    _fake_samples(tmp_path / "noise", noise, tmp_path)
    cfg = EvalConfig(classifier_epochs=10, subset_size=200, actors=2)
    good = sample_quality(load_manifest(data), str(tmp_path / "real"), cfg)
    bad = sample_quality(load_manifest(data), str(tmp_path / "noise"), cfg)
    assert good.fd_label == "FD (digits classifier)" and good.fid is None and good.features == "classifier"
    assert "Inception-v3 features of 8x8 images" in good.fid_note
    assert good.classifier_test_accuracy > 0.9
    assert good.fd < 0.1 * bad.fd and good.kid < bad.kid
    assert good.precision > 0.5 > bad.precision and good.recall > bad.recall
    # against the training split (the papers' convention), with the floor of held-out real images beside it
    m = load_manifest(data)
    n_train, n_test = m.count("train"), m.count("test")
    assert n_test > 300 and (good.reference_split, good.num_reference, good.floor_split) == ("train", n_train, "test")
    # the floor uses about as many held-out images as there are samples (an id-hashed subset), since the
    # distance's bias depends on the count
    test_ids = pa.concat_tables([pq.read_table(p) for p in m.shard_paths("test")])["id"].to_pylist()
    assert good.num_floor == int(in_subset(test_ids, 300 / n_test).sum())
    assert abs(good.num_floor - 300) < 40 and good.fd_floor < 0.1 * bad.fd
    assert good.num_samples == 300 and good.num_matched == 300
    assert good.fd_matched == pytest.approx(good.fd)
    # more samples than held-out images: the floor takes them all, the model is also scored on as many samples
    train = pa.concat_tables([pq.read_table(p) for p in sorted(data.glob("train-*.parquet"))])
    many = np.frombuffer(b"".join(train["image"].to_pylist()[:500]), np.uint8).reshape(-1, 8, 8, 1)
    _fake_samples(tmp_path / "many", many, tmp_path)
    more = sample_quality(load_manifest(data), str(tmp_path / "many"), cfg)
    assert (more.num_samples, more.num_floor, more.num_matched) == (500, n_test, n_test)
    assert more.fd_matched != more.fd
    assert (data / "classifier" / "epochs10-seed0" / "model.pt").exists()  # trained once, then cached
    cached = sorted((data / "feature_stats").glob("classifier-*.npz"))
    # reference statistics are cached, the capped floor's apart from the whole split's
    assert [p.name.split("-")[2:4] for p in cached][:2] == [["test", cached[0].name.split("-")[3]], ["test", "max300"]]
    assert len(cached) == 3 and cached[2].name.split("-")[2] == "train"
    # eval.reference_max: about that many reference images, the same id-hashed ones every time
    train_ids = train["id"].to_pylist()
    capped = sample_quality(load_manifest(data), str(tmp_path / "real"), replace(cfg, reference_max=500))
    assert capped.num_reference == int(in_subset(train_ids, 500 / n_train).sum())
    assert abs(capped.num_reference - 500) < 60 and capped.fd != good.fd
    again = sample_quality(load_manifest(data), str(tmp_path / "real"), cfg)
    assert again.fd == pytest.approx(good.fd) and again.fd_floor == good.fd_floor
    # the streamed statistics of the Ray stage are those of all features in one process
    net, _, _ = feature_net(load_manifest(data), cfg)
    model = load_network(net, torch.device("cpu"))
    direct = extract(net, model, torch.from_numpy(real).permute(0, 3, 1, 2), torch.device("cpu")).double()
    staged = feature_stage(
        [str(tmp_path / "real" / "block-00000000.parquet")], [8, 8, 1], net, 300, batch_size=7, actors=2
    )
    mean, cov = staged.stats.mean_cov()
    ref_mean, ref_cov = gaussian_stats(direct)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-4, atol=1e-5)
    assert split_stats(load_manifest(data), "train", net).cached
    # the KID / precision-recall subset: the same ids (by id hash, in id order) with 1 actor or 2 tasks (the
    # classifier's default: pooled workers that keep it loaded) and any batch size
    one = feature_stage(
        [str(tmp_path / "real" / "block-00000000.parquet")],
        [8, 8, 1],
        net,
        300,
        subset_size=50,
        batch_size=32,
        actors=1,
        pool="actors",
    )
    two = feature_stage(
        [str(tmp_path / "real" / "block-00000000.parquet")], [8, 8, 1], net, 300, subset_size=50, batch_size=7, actors=2
    )
    assert len(one.subset_ids) == 50 and one.subset_ids.tolist() == sorted(one.subset_ids.tolist())
    assert one.subset_ids.tolist() == two.subset_ids.tolist()
    torch.testing.assert_close(one.subset, two.subset, rtol=1e-5, atol=1e-5)  # float32 kernels of other batch sizes
    torch.testing.assert_close(one.subset, direct[one.subset_ids].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.stats.mean_cov()[1], cov, rtol=1e-4, atol=1e-5)  # the actor's statistics too


def test_a_feature_pool_on_tasks_is_the_classifiers_on_the_cpu_alone():
    from pipelines.batch.features import FeatureNet, feature_stage

    inception = FeatureNet("inception", "FID")
    for kwargs, what in (
        ({"net": inception, "pool": "tasks"}, "the inception features with gpus_per_actor=0"),
        ({"net": FeatureNet("classifier", "FD", "x"), "pool": "tasks", "gpus_per_actor": 1}, "gpus_per_actor=1"),
        ({"net": inception, "pool": "threads"}, "'threads' is not allowed"),
    ):
        with pytest.raises(ValueError, match=rf"feature pool .*{what}.*; allowed: auto, actors, and tasks for the "):
            feature_stage(["never-read.parquet"], [8, 8, 1], total=1, **kwargs)


def test_eval_precision_runs_the_likelihood_network_under_autocast(tmp_path):
    """eval.precision=bf16: the likelihood actor's network runs under bf16 autocast, its NLLs move by bf16's rounding
    and no more, and the default is fp32; fp16 on CPU actors is refused before Ray."""
    from fm.models import MLP
    from pipelines.batch.evaluate import LikelihoodActor
    from pipelines.core.shards import group_rows

    torch.manual_seed(0)
    manifest = load_manifest(ingest("toy2d:moons", tmp_path / "moons", shards=1).out)
    net = MLP(dim=2, hidden=64, depth=2)
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        step=0,
        model=net,
        ema_state=EMA(net).state_dict(),
        optimizer=None,
        model_name="mlp",
        model_kwargs={"dim": 2, "hidden": 64, "depth": 2},
        method_kwargs={"name": "fm_ot", "sigma_min": 0.0},
        config={},
        manifest={"source": "toy2d:moons", "kind": "points", "shape": [2], "num_classes": 1, "class_names": []},
    )
    files = tuple(manifest.shard_paths("test"))
    nll, dtypes, threads = {}, set(), torch.get_num_threads()
    for precision in ("fp32", "bf16"):
        cfg = EvalConfig(max_images=16, batch_size=16, solver="rk4", steps=8, precision=precision)
        actor = LikelihoodActor(str(ckpt), cfg, manifest.data, files, group_rows(files), manifest.count("test"))
        actor.loaded.model.out.register_forward_hook(lambda m, i, out, p=precision: dtypes.add((p, out.dtype)))
        nll[precision], nfe = actor.score(actor.rows)
        assert nfe == 8 * 4 and np.isfinite(nll[precision]).all()
    torch.set_num_threads(threads)  # the actor took its share of the threads: the suite goes on as it was
    assert dtypes == {("fp32", torch.float32), ("bf16", torch.bfloat16)}
    assert 0 < np.abs(nll["bf16"] - nll["fp32"]).max() < 0.1  # nats; bf16 keeps 8 bits of mantissa
    assert EvalConfig().precision == "fp32"
    with pytest.raises(
        ConfigError,
        match=r"^eval.precision: 'fp16' is not allowed; fp16 needs GPU actors "
        r"\(eval.gpus_per_actor > 0\); use fp32 or bf16 on CPU$",
    ):
        run_evaluation(str(ckpt), manifest, None, EvalConfig(precision="fp16"))


def test_bad_evaluation_input(tmp_path, digits_copy):
    ckpt = gaussian_checkpoint(tmp_path / "ckpt", [4, 4, 1])
    with pytest.raises(EvaluationError, match=r"trained on shape \[4, 4, 1\], but .* holds \[8, 8, 1\]"):
        run_evaluation(str(ckpt), str(tmp_path / "digits"), None, EvalConfig())
    with pytest.raises(ConfigError, match="eval.draws: 0 is not allowed"):
        run_evaluation(str(ckpt), str(tmp_path / "digits"), None, EvalConfig(draws=0))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / SETTINGS).write_text("{}")
    ckpt8 = gaussian_checkpoint(tmp_path / "ckpt8", [8, 8, 1])
    with pytest.raises(SamplingError, match="holds no sample shards"):
        run_evaluation(str(ckpt8), str(tmp_path / "digits"), str(tmp_path / "empty"), EvalConfig())


def test_compare_prints_the_table_for_fixture_runs(tmp_path, capsys):
    from jobs.compare import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    # 2 seeds of fm_ot; otcfm with uniform and with logit-normal t: another model, so another row
    fixtures = [
        ("fm_ot", 3.1, 20.0, 98, "uniform"),
        ("fm_ot", 3.3, 22.0, 102, "uniform"),
        ("otcfm", 3.0, 15.0, 60, "uniform"),
        ("otcfm", 3.05, 14.0, 58, "logit_normal"),
    ]
    for method, bpd, fd, nfe, timing in fixtures:
        train = client.create_run(exp, tags={"flowray.kind": "train"}).info.run_id
        client.log_param(train, "method.name", method)
        client.log_param(train, "train.steps", "500")
        client.log_param(train, "method.ot_scope", "global")
        client.log_param(train, "method.time_sampling", timing)
        if bpd == 3.1:  # a key added later: runs from before it do not record it, and are not told apart by it
            client.log_param(train, "method.meanflow_ratio", "0.25")
        sample = client.create_run(exp, tags={"flowray.kind": "sample"}).info.run_id
        client.log_metric(sample, "mean_nfe", nfe)
        ev = client.create_run(
            exp,
            tags={
                "flowray.kind": "evaluate",
                "flowray.train_run_id": train,
                "flowray.sample_run_id": sample,
                "flowray.method": method,
                "flowray.sample_solver": "dopri5",
                "flowray.sample_steps": "100",
                "flowray.fd_label": "FD (digits classifier)",
            },
        ).info.run_id
        client.log_metric(ev, "bpd", bpd)
        client.log_metric(ev, "fd", fd)
        client.log_metric(ev, "fd_floor", 2.0)
        client.log_metric(ev, "fd_matched", fd + 1)
        client.log_metric(ev, "likelihood_nfe", 2 * nfe)
        client.log_metric(ev, "straightness", {"fm_ot": 0.3, "otcfm": 0.1}[method] + (bpd - 3.1) / 10)
    result = main(["--experiment", "cmp", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| fm_ot") or line.startswith("| otcfm")]
    assert len(lines) == 3
    sd_bpd, sd_fd = math.sqrt(0.02), math.sqrt(2.0)
    assert lines[0].startswith(
        f"| fm_ot | OT (sigma_min) | independent | dopri5 | adaptive | 500 | 2 | "
        f"3.200 ± {sd_bpd:.3f} | 21.000 ± {sd_fd:.3f} | 22.000 ± {sd_fd:.3f} | 2.000 | "
        f"0.310 ± {math.sqrt(0.0002):.3f} | 100 ± 3 | 200 ± 6 |"
    )
    assert lines[1].startswith(
        "| otcfm (time_sampling=logit_normal) | straight line | exact OT (global batch) | "
        "dopri5 | adaptive | 500 | 1 | 3.050 | 14.000 | 15.000 | 2.000 | 0.095 | 58 | 116 |"
    )
    assert lines[2].startswith(
        "| otcfm (time_sampling=uniform) | straight line | exact OT (global batch) | dopri5 | "
        "adaptive | 500 | 1 | 3.000 | 15.000 | 16.000 | 2.000 | 0.090 | 60 | 120 |"
    )
    assert "| floor (real vs real) | straightness | sample NFE |" in out
    assert "| FD (digits classifier) at the floor's count | floor (real vs real) |" in out
    assert "FD (digits classifier)" in out
    assert result["rows"] == 3 and (tmp_path / "out" / "cmp.csv").exists()
    assert (tmp_path / "out" / "cmp-nfe-vs-fd.png").exists()
    arts = {a.path for a in client.list_artifacts(result["compare_run_id"])}
    assert arts == {"cmp.csv", "cmp.md", "cmp-nfe-vs-fd.png"}
