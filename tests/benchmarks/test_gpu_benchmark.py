"""The GPU benchmark's step variants run end to end on the CPU with a tiny model (no timing is asserted: the
figures are for a GPU machine, `python -m benchmarks.gpu_throughput`)."""

import math

import torch

from benchmarks.gpu_throughput import step_variants
from fm.models import UNet


def test_step_variants_measure_every_variant_and_keep_the_fastest_layout():
    out = step_variants(
        lambda: UNet(
            image_size=8,
            in_channels=1,
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            num_heads=1,
        ),
        (1, 8, 8),
        batch=16,
        steps=2,
        device=torch.device("cpu"),
        compile_model=False,
    )
    times = {k: v for k, v in out.items() if k.endswith("_s")}
    assert set(times) == {"icfm_eager_s", "icfm_channels_last_s", "otcfm_in_step_s", "otcfm_ahead_s"}
    assert all(v > 0 for v in times.values())
    assert out["layout"] in ("eager", "channels_last")
    assert out[f"icfm_{out['layout']}_s"] == min(out["icfm_eager_s"], out["icfm_channels_last_s"])
    assert math.isclose(out["otcfm_ahead_ratio"], out["otcfm_ahead_s"] / out[f"icfm_{out['layout']}_s"])
