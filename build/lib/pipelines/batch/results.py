"""What the evaluation stage returns and logs: bits/dim over a split (`SplitLikelihood`), sample quality
(`QualityResult`), straightness, the snapshot transport's distances, and the whole (`EvaluationResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from pipelines.core.errors import ConfigError
from pipelines.core.samples import sampling_run_id, sampling_settings


class EvaluationError(ConfigError):
    """Bad evaluation request."""


@dataclass
class SplitLikelihood:
    """Bits/dim of images (or NLL in nats of points) over a split, with the estimator's settings."""

    metric: str  # "bpd" or "nll": the MLflow metric name
    unit: str  # "bits/dim" or "nats"
    mean: float
    stderr: float
    n: int  # rows scored
    mean_nfe: float
    draws: int  # K dequantization draws
    divergence: str  # "exact" or "hutchinson"
    probes: int | None  # H Hutchinson probes; None for the exact divergence
    images_per_s: float
    wall_s: float
    precision: str = "fp32"  # eval.precision: the network's autocast dtype
    # per row, in the split's row order: which rows, their values and solves' NFE. Logged as the evaluation run's
    # artifact `likelihood/<metric>_per_row.csv` (two methods scored on the same rows compare pairwise), kept out of
    # the job's JSON line
    rows: list[int] = field(default_factory=list, repr=False)
    values: list[float] = field(default_factory=list, repr=False)
    nfes: list[float] = field(default_factory=list, repr=False)


@dataclass
class TransportResult:
    """Snapshot methods: W2 at every observed time between the transported first snapshot and the held-out rows,
    beside the floor (as many training rows of that time)."""

    times: list[float]
    n_start: int
    wall_s: float
    mean_nfe: float
    w2: list[float] = field(default_factory=list)
    w2_floor: list[float] = field(default_factory=list)

    @property
    def w2_ratio_max(self) -> float:
        """The worst W2 / floor over the observed times after the first (the start itself is the data)."""
        return max(w / f for w, f in zip(self.w2[1:], self.w2_floor[1:], strict=True))


@dataclass
class QualityResult:
    """Sample quality. Images: a Fréchet distance in a feature network's features (FID for Inception) against a
    reference split, its floor (held-out real images), KID and precision/recall. Points: W2 (geodesic on a manifold)
    to the data. A field is None where it does not apply."""

    num_samples: int
    # points
    w2: float | None = None
    w2_floor: float | None = None
    w2_kind: str | None = None  # "geodesic" on a manifold
    num_reference: int | None = None
    # images
    fd_label: str | None = None  # "FID", or "FD (<data> classifier)"
    features: str | None = None  # "inception" or "classifier"
    fd: float | None = None
    fid: float | None = None  # fd, when the features are Inception's
    fid_note: str | None = None
    kid: float | None = None
    kid_std: float | None = None
    kid_subset: int | None = None
    precision: float | None = None
    recall: float | None = None
    pr_subset: list[int] | None = None  # reference and sample subset sizes for KID and precision/recall
    reference_split: str | None = None
    feature_images_per_s: float | None = None
    classifier_test_accuracy: float | None = None
    classifier_path: str | None = None
    fd_floor: float | None = None  # the reference against held-out real images: what a perfect model would score
    floor_split: str | None = None
    num_floor: int | None = None
    fd_matched: float | None = None  # the model on as many samples as there are held-out images
    num_matched: int | None = None
    datasets: list[dict] = field(default_factory=list)  # what was read: reference, floor, samples (`dataset_input`)


@dataclass
class StraightnessResult:
    """How straight the model's sampling trajectories are (`fm.straightness`): means over `samples` trajectories
    from the noise of seeds derive_seed(eval.seed, 3, i), solved with `steps` RK4 steps."""

    samples: int
    steps: int
    straightness: float  # Liu et al. 2022, Eq. 6, per dimension
    straightness_relative: float  # over the squared chord length per dimension
    chord_deviation: float
    nfe: int
    wall_s: float


@dataclass
class EvaluationResult:
    """What an evaluation of one checkpoint found: likelihood (or transport, for snapshot methods), sample quality
    when samples were given, and the runs it belongs to."""

    method: str
    checkpoint_step: int
    train_run_id: str | None = None
    likelihood: SplitLikelihood | None = None
    transport: TransportResult | None = None
    quality: QualityResult | None = None
    straightness: StraightnessResult | None = None  # Euclidean methods, with eval.straightness_samples > 0
    sample_run_id: str | None = None  # the MLflow run that logged the samples
    sample_settings: dict | None = None  # the settings the samples were made with (`_sampling.json`)
    split_dataset: dict | None = None  # the split the likelihood (or transport) read (`Manifest.dataset`)
    mlflow_run_id: str | None = None  # the evaluation run, once logged (`log_evaluation_run`)

    def with_samples(self, quality: QualityResult, samples_dir: str) -> EvaluationResult:
        """The same model's result for another sampling output: its quality, the likelihood kept."""
        return replace(
            self,
            quality=quality,
            sample_run_id=sampling_run_id(samples_dir),
            sample_settings=sampling_settings(samples_dir),
            mlflow_run_id=None,
        )

    def headline(self) -> dict[str, object]:
        """The figures a registry version carries as its latest evaluation (None where they do not apply)."""
        lik, q, tr = self.likelihood, self.quality, self.transport
        out: dict[str, object] = {"evaluation_run": self.mlflow_run_id, "evaluated_step": self.checkpoint_step}
        if lik is not None:
            out.update({lik.metric: round(lik.mean, 4), "likelihood_nfe": round(lik.mean_nfe, 1)})
        if q is not None:
            out.update(
                {
                    "fd_label": q.fd_label,
                    "fd": q.fd,
                    "fd_floor": q.fd_floor,
                    "fid": q.fid,
                    "w2": q.w2,
                    "sample_solver": (self.sample_settings or {}).get("solver"),
                }
            )
        if tr is not None:
            out["w2_ratio_max"] = tr.w2_ratio_max
        if self.straightness is not None:
            out["straightness"] = round(self.straightness.straightness, 6)
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("rows", "values", "nfes"):  # per-row values are an MLflow artifact, not part of the JSON line
            (out["likelihood"] or {}).pop(key, None)
        return out
