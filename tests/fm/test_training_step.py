import math

import pytest
import torch

from fm.methods import make_method
from fm.models import MLP
from fm.training import lr_at, train_step


class NaNAfter(torch.nn.Module):
    """An MLP whose output turns non-finite when `poison` is set."""

    def __init__(self):
        super().__init__()
        self.net, self.poison = MLP(2, 16, 1), False

    def forward(self, x, t, y=None):
        out = self.net(x, t, y)
        return out * math.inf if self.poison else out


def test_non_finite_steps_are_skipped_without_touching_weights():
    model = NaNAfter()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = make_method("fm_ot")
    x = torch.randn(32, 2)
    ok = train_step(model, method, opt, x)
    assert ok.finite and ok.grad_norm > 0
    before = [p.detach().clone() for p in model.parameters()]
    model.poison = True
    bad = train_step(model, method, opt, x)
    assert not bad.finite and not math.isfinite(bad.loss)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_grad_clip_and_warmup():
    model = MLP(2, 16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    res = train_step(model, make_method("fm_ot"), opt, 100 * torch.randn(16, 2), grad_clip=1e-3)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert res.grad_norm > 1e-3 and total.item() == pytest.approx(1e-3, rel=1e-4)
    assert lr_at(0, 1.0, 10) == pytest.approx(0.1) and lr_at(50, 1.0, 10) == 1.0


def test_learning_rate_schedules():
    # warm-up, then the decay phase from step 10 to 110
    assert [lr_at(s, 1.0, 10, "constant", 110) for s in (9, 10, 109)] == [1.0, 1.0, 1.0]
    assert lr_at(60, 1.0, 10, "cosine", 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, "cosine", 110, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(35, 1.0, 10, "polynomial", 110, power=2.0) == pytest.approx(0.75**2)
    assert lr_at(500, 1.0, 10, "polynomial", 110) == 0.0  # stays at min_lr past the end
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'; allowed: constant, cosine"):
        lr_at(0, 1.0, schedule="step")


def test_a_run_of_non_finite_steps_stops_training_naming_the_limit():
    from fm.ema import EMA
    from fm.training import StepResult
    from pipelines.train.worker import TrainingError, WorkerState

    model = MLP(2, 16, 1)
    state = WorkerState(
        model,
        model,
        make_method("fm_ot"),
        torch.optim.Adam(model.parameters()),
        EMA(model),
        torch.device("cpu"),
        rank=0,
        world=1,
        step=41,
    )
    bad, good = StepResult(math.nan, math.nan, False), StepResult(1.0, 1.0, True)
    state.count_nonfinite(bad, limit=3)
    state.count_nonfinite(good, limit=3)  # a finite step resets the run, not the total
    state.count_nonfinite(bad, limit=3)
    state.count_nonfinite(bad, limit=3)
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row at step 42 \(train.max_nonfinite=3\)"):
        state.count_nonfinite(bad, limit=3)
    assert state.nonfinite_total == 4


@pytest.mark.parametrize("name", ["otcfm", "sbcfm", "fm_ot"])
@pytest.mark.parametrize("buffer", [0, 3])
def test_pairing_ahead_of_the_step_trains_exactly_as_pairing_in_it(name, buffer):
    from fm.seeding import generator
    from fm.training import pair_step, read_ahead

    data = [torch.randn(32, 2, generator=generator(7, k)) + 2 for k in range(6)]

    def fresh():
        torch.manual_seed(0)
        model = MLP(2, 32, 2)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), make_method(name)

    model_a, opt_a, method_a = fresh()
    losses_a = [
        train_step(model_a, method_a, opt_a, x_1, None, generator(0, 0, step)).loss for step, x_1 in enumerate(data)
    ]
    model_b, opt_b, method_b = fresh()
    ahead = read_ahead(
        enumerate(data), lambda item: pair_step(method_b, item[1], None, generator(0, 0, item[0])), buffer
    )
    losses_b = [train_step(model_b, method_b, opt_b, pairs.x_1, None, None, pairs=pairs).loss for pairs in ahead]
    assert losses_a == losses_b
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_read_ahead_raises_the_threads_error_in_order():
    from fm.training import read_ahead

    def fn(k):
        if k == 3:
            raise ValueError("bad item 3")
        return k * 10

    out = read_ahead(iter(range(6)), fn, buffer=2)
    assert [next(out) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError, match="bad item 3"):
        next(out)


def test_fp16_with_a_scaler_steps_as_fp32_does_and_skips_an_overflow_without_counting_it():
    """fp16 autocast (on CPU here, where torch has it) with a GradScaler: the update equals the fp32 one within
    fp16 rounding; a scale so large that the scaled gradients overflow skips the update, halves the scale, and is
    not reported as a non-finite step (the loss itself is finite)."""
    method = make_method("fm_ot")
    x = torch.randn(64, 2)

    def step(dtype, scaler):
        torch.manual_seed(0)
        model = MLP(2, 32, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        res = train_step(
            model, method, opt, x, generator=torch.Generator().manual_seed(1), autocast_dtype=dtype, scaler=scaler
        )
        return model, res

    plain, ref = step(None, None)
    scaled, res = step(torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert res.finite and abs(res.loss - ref.loss) < 1e-2 * abs(ref.loss)
    for p, q in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=2e-3)
    torch.manual_seed(0)
    before = [p.detach().clone() for p in MLP(2, 32, 2).parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # x * 2^126 overflows fp32 gradients
    skipped, res = step(torch.float16, scaler)
    assert res.finite and scaler.get_scale() == 2.0**125
    for p, q in zip(skipped.parameters(), before, strict=True):
        assert torch.equal(p, q)
