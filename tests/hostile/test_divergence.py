"""Hostile input: training that diverges (a NaN loss, a huge learning rate, weights gone non-finite)
stops with one line naming the step and the last good checkpoint, and keeps no bad weights."""

import torch

from helpers import assert_refused, quick_train


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F
    real = F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":       # the training loss, not evaluation's sum
            calls["train"] += 1
            if calls["train"] == 7:                            # step 6 (0-based)
                return loss * float("nan")
        return loss
    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    result = quick_train(out, "train.checkpoint_interval=4")
    assert_refused(result, "training diverged at step 6: loss is nan")
    assert f"{out / 'checkpoint.pt'} (step 4)" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_huge_learning_rate_diverges_without_a_checkpoint_of_bad_weights(tmp_path):
    out = tmp_path / "run"
    result = quick_train(out, "optim.lr=1e30", "train.checkpoint_interval=1")
    assert_refused(result, "training diverged at step")
    assert "lower optim.lr" in result.stderr
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()


def test_weights_gone_non_finite_before_a_mask_recompute_read_as_divergence(tmp_path, monkeypatch):
    # The transposable solvers refuse NaN/Inf weights; when the update made them so, the run must stop
    # with the divergence message, not a solver's error.
    from nmtrain.experiments.methods import transposable
    real = transposable.Transposable._compute

    calls = []

    def poison_then_compute(self, solver):
        calls.append(solver)
        if len(calls) == 2:                   # the first mask, then the recompute before step 3: poison first
            next(iter(self.ctx.layers.values())).weight.data[0, 0] = float("inf")
        return real(self, solver)
    monkeypatch.setattr(transposable.Transposable, "_compute", poison_then_compute)
    out = tmp_path / "run"
    result = quick_train(out, "--method", "transposable", "method.params.mask_interval=3")
    assert_refused(result, "training diverged at step 2: the weights are not finite after the update")
    assert not (out / "model.pt").exists()
