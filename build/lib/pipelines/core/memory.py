"""What one task or worker would hold for a size-like key (a batch, a block), estimated before Ray starts.

A size that no process of this machine could hold is refused in words, with the estimate and its parts, instead of
being handed to Ray, whose out-of-memory monitor would kill one task after another. The estimates are upper-ish
bounds, not measurements: a UNet's activations are taken as a multiple of its skip feature maps (the maps it keeps
from the encoder for the decoder), fitted to peak-RSS measurements on CPU of three UNets (8x8 to 32x32, 16 to 64
channels): forward and backward held 22-27 times those maps' float32 bytes per item, a no-grad forward 4-8 times;
the factors below are about 1.3 times the largest seen.
"""

from __future__ import annotations

from pipelines.core.errors import ConfigError

TRAIN_FACTOR = 32  # forward + backward, per item, in units of the skip maps' float32 bytes
INFERENCE_FACTOR = 10  # a no-grad forward (plus an adaptive solver's stages), same units
WORKER_BYTES = 2 << 30  # a Ray worker with torch loaded and the model's weights and optimizer state
# the FID Inception-v3 actor: peak RSS of one process with torch and the network loaded was 642 MB at a batch of 8,
# 1,079 at 32 and 1,659 at 64 (32x32 inputs, resized to 299x299 inside): about 500 MB plus 18 MB per image; Ray
# Data's memory detector wants 1.25 times the peak declared, so about 1.4 times the measured line is declared
INCEPTION_BYTES = 1 << 30
INCEPTION_ITEM_BYTES = 24 << 20
CLASSIFIER_BYTES = 1 << 30  # the data set's SmallCNN: torch and a model of a few MB; its activations are small


def model_item_bytes(model_name: str, kwargs: dict, training: bool) -> int:
    """Estimated activation bytes per batch item of a `fm.models` model built with `kwargs` (0 for a model without
    layers, such as the closed-form `gaussian_ot`)."""
    factor = TRAIN_FACTOR if training else INFERENCE_FACTOR
    if model_name == "mlp":
        return 4 * factor * int(kwargs.get("hidden", 256)) * (int(kwargs.get("depth", 3)) + 1)
    if model_name != "unet":
        return 0
    h, channels = int(kwargs["image_size"]), int(kwargs["model_channels"])
    blocks = int(kwargs["num_res_blocks"]) + 1
    skips = sum(blocks * channels * mult * (h // 2**level) ** 2 for level, mult in enumerate(kwargs["channel_mult"]))
    return 4 * factor * skips


def feature_actor_bytes(kind: str, batch: int) -> int:
    """What a feature actor (`pipelines.batch.features.FeatureActor`) holds with `batch` images per call: the memory its
    stage declares to Ray."""
    if kind == "inception":
        return INCEPTION_BYTES + batch * INCEPTION_ITEM_BYTES
    return CLASSIFIER_BYTES


def machine_memory() -> int:
    """This machine's physical memory in bytes (the budget of a check made before Ray starts)."""
    import psutil

    return psutil.virtual_memory().total


def check_fits(
    key: str,
    value: int,
    item_bytes: int,
    what: str,
    fixed: int = WORKER_BYTES,
    budget: int | None = None,
    hint: str = "",
) -> int:
    """Refuse `key=value` when `fixed + value * item_bytes` exceeds `budget` (this machine's memory); returns the
    estimate."""
    need, budget = fixed + value * item_bytes, budget or machine_memory()
    if need > budget:
        raise ConfigError(
            f"{key}={value}: {what} would hold about {gib(need)} ({value:,} x {gib(item_bytes)} per "
            f"item{hint}, and {gib(fixed)} for the process), more than this machine's {gib(budget)} "
            f"of memory; lower {key}"
        )
    return need


def gib(n: float) -> str:
    """A byte count for people: 1.5 GiB, 340 MiB, 12 KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"
