"""The validation loss: fixed draws, so a value changes only with the model; the model's mode is left as it was."""

import torch

from fm.methods import make_method
from fm.models import build_model
from pipelines.train.validation import ValidationSet, validation_loss


def test_the_validation_loss_repeats_exactly_and_leaves_the_model_training():
    torch.manual_seed(0)
    model = build_model("mlp", dim=2, hidden=32, depth=2).train()
    vset = ValidationSet(torch.randn(300, 2), None)  # two batches of 256 and 44
    method = make_method("otcfm")
    first = validation_loss(method, model, vset, torch.device("cpu"))
    assert model.training
    assert validation_loss(method, model, vset, torch.device("cpu")) == first
    # another model gives another value on the same draws; the global generator is never touched
    other = build_model("mlp", dim=2, hidden=32, depth=2)
    assert validation_loss(method, other, vset, torch.device("cpu")) != first
    before = torch.get_rng_state()
    validation_loss(method, model, vset, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


class Zero(torch.nn.Module):
    def forward(self, x, t, y=None):
        return torch.zeros_like(x)


def test_a_zero_field_scores_the_mean_squared_target():
    """FM-OT with sigma_min = 0: the target is x_1 - x_0, so a zero field's loss is E|x_1 - x_0|^2 / D = 2 for
    x_1, x_0 ~ N(0, I) (600 draws of the mean: within 0.3 at about 6 standard errors)."""
    torch.manual_seed(1)
    vset = ValidationSet(torch.randn(600, 2), None)
    value = validation_loss(make_method("fm_ot", sigma_min=0.0), Zero(), vset, torch.device("cpu"))
    assert abs(value - 2.0) < 0.3
