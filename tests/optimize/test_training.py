"""The shared training loop: schedule, early stopping, budgets, checkpoint and exact resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from modelpress.errors import ConfigError, OptimizationError
from modelpress.optimize.train.loop import LATEST, TrainConfig, latest_checkpoint, train


class Net(torch.nn.Module):
    """A small regression net with dropout, so resume must restore the RNG to be exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 16)
        self.drop = torch.nn.Dropout(0.2)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


g = torch.Generator().manual_seed(1)
X = torch.randn(256, 4, generator=g)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def loss_fn(model: torch.nn.Module, step: int) -> torch.Tensor:
    idx = torch.arange(step * 16, step * 16 + 16) % len(X)  # the batch is a function of the step
    return torch.nn.functional.mse_loss(model(X[idx]), Y[idx])


def val_loss(model: torch.nn.Module) -> float:
    with torch.no_grad():  # the training loop calls it without gradients; so do the test's own calls
        return float(torch.nn.functional.mse_loss(model(X), Y))


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(max_steps=100, warmup=0.1, lr=1.0, eval_every=None)
    assert cfg.warmup_steps == 10
    factors = [cfg.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 11)
    assert factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(1 / 90)
    assert all(b <= a for a, b in itertools.pairwise(factors[10:]))
    flat = TrainConfig(max_steps=100, warmup=0.0, decay="constant", eval_every=None)
    assert {flat.lr_factor(s) for s in range(100)} == {1.0}


def test_training_lowers_the_loss_and_keeps_the_best_weights():
    model = Net()
    before = val_loss(model.eval())
    res = train(
        model, loss_fn, TrainConfig(max_steps=120, lr=1e-2, eval_every=20, patience=None), evaluate=val_loss, higher_is_better=False
    )
    assert res.steps == 120 and res.stopped == "max_steps"
    assert res.first_metric == pytest.approx(before)
    assert res.best_metric < 0.5 * before
    assert val_loss(model.eval()) == pytest.approx(res.best_metric)  # the best weights are the ones restored
    metrics = [h["metric"] for h in res.history if "metric" in h]
    assert len(metrics) == 1 + 120 // 20  # at the start and every 20 steps (the last one at the end)


def test_early_stopping_after_patience_evaluations_without_improvement():
    model = Net()
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9, 0.95])
    res = train(model, loss_fn, TrainConfig(max_steps=200, eval_every=10, patience=3), evaluate=lambda m: next(scores))
    assert res.stopped == "early stopping"
    assert res.steps == 40  # best at step 10 (0.6), then 3 evaluations without improvement
    assert res.best_step == 10 and res.best_metric == pytest.approx(0.6)


def test_the_time_budget_stops_training():
    calls = []

    def slow(model, step):
        calls.append(step)
        import time

        time.sleep(0.02)
        return loss_fn(model, step)

    res = train(Net(), slow, TrainConfig(max_steps=10_000, max_seconds=0.2, eval_every=None))
    assert res.stopped == "time budget"
    assert 1 <= res.steps < 100 and res.steps == len(calls)


def test_checkpoint_and_resume_give_the_same_weights(tmp_path):
    cfg = TrainConfig(max_steps=24, lr=1e-2, eval_every=6, patience=None, checkpoint_every=4)
    straight = Net()
    ref = train(straight, loss_fn, cfg, evaluate=val_loss, higher_is_better=False)

    def crashing(model, step):
        if step == 14:
            raise KeyboardInterrupt  # the process dies while computing step 15
        return loss_fn(model, step)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(Net(), crashing, cfg, evaluate=val_loss, higher_is_better=False, checkpoint_dir=ckpt)
    found = latest_checkpoint(ckpt)
    assert found is not None and found.name == "step-000012"
    state = json.loads((found / "state.json").read_text())
    assert state["step"] == 12 and not state["finished"]
    assert sorted(p.name for p in found.iterdir()) == ["best.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]

    resumed = Net()
    res = train(resumed, loss_fn, cfg, evaluate=val_loss, higher_is_better=False, checkpoint_dir=ckpt)
    assert res.resumed_from == 12 and res.steps == 24
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert res.best_metric == ref.best_metric and res.best_step == ref.best_step

    # A finished run is not trained again: resuming returns its result with the best weights.
    again = Net()
    res2 = train(again, loss_fn, cfg, evaluate=val_loss, higher_is_better=False, checkpoint_dir=ckpt)
    assert res2.steps == 24 and torch.equal(again.a.weight, straight.a.weight)


def test_resume_with_other_settings_is_refused(tmp_path):
    train(Net(), loss_fn, TrainConfig(max_steps=4, eval_every=None, checkpoint_every=2), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="other training settings"):
        train(Net(), loss_fn, TrainConfig(max_steps=8, eval_every=None, checkpoint_every=2), checkpoint_dir=tmp_path)


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    train(Net(), loss_fn, TrainConfig(max_steps=4, eval_every=None, checkpoint_every=2), checkpoint_dir=tmp_path)
    (tmp_path / ".step-000006.tmp-x").mkdir()  # what a crash during a write leaves behind
    assert latest_checkpoint(tmp_path).name == "step-000004"
    (tmp_path / LATEST).write_text("step-000099")  # a pointer to a folder that is not there
    assert latest_checkpoint(tmp_path) is None


def test_a_diverging_loss_fails_with_a_hint():
    with pytest.raises(OptimizationError, match="lr"):
        train(Net(), lambda m, s: loss_fn(m, s) * float("nan"), TrainConfig(max_steps=3, eval_every=None))


def test_config_is_checked():
    with pytest.raises(ConfigError, match="eval_every"):
        TrainConfig(max_steps=10, eval_every=50)
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        TrainConfig(max_step=10)
    assert TrainConfig.model_validate_json(TrainConfig(max_steps=7, eval_every=7).model_dump_json()) == TrainConfig(
        max_steps=7, eval_every=7
    )


def test_progress_is_reported_per_step_not_printed(capsys):
    seen = []

    def factory(desc, total):
        seen.append((desc, total))
        return lambda n: seen.append(n)

    train(Net(), loss_fn, TrainConfig(max_steps=5, eval_every=None), progress=factory, description="fine-tuning")
    assert seen[0] == ("fine-tuning", 5) and sum(x for x in seen[1:]) == 5
    assert capsys.readouterr().out == ""
