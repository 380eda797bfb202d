"""Smoke test of examples/train_projected.py: a tiny run, wrapped and bare."""

import math

import keras
import pytest
from test_examples import _load


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the example runs on every backend, but one tiny run (on "
    "TensorFlow) is enough for CI; the wrapper is tested on all three",
)
def test_train_projected_tiny_run(capsys):
    example = _load("train_projected")
    # A large rate, so that six steps move the norms measurably.
    argv = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32"]
    argv += ["--learning-rate", "0.01"]
    wrapped, bare = example.main([*argv, "--compare"])
    assert wrapped["optimizer"] == "Projected(Lion)" and bare["optimizer"] == "Lion"
    for r in (wrapped, bare):
        # The three convolutions before BatchNorm, flagged by the wrapper's
        # test on one batch; not the Dense head.
        assert r["kernels"] == 3
        assert len(r["norms"]) == 2 and all(math.isfinite(n) for n in r["norms"])
        assert 0.0 <= r["test_accuracy"] <= 1.0
    # Same model, same initial weights.
    assert wrapped["initial_norm"] == bare["initial_norm"]
    # Not the same training: the projection held the kernels' norm growth
    # well below the bare Lion's (measured +9% against +14%; Lion's sign
    # breaks tangency, so the wrapped norm still grows).
    growth = [r["norms"][-1] - r["initial_norm"] for r in (wrapped, bare)]
    assert 0 < growth[0] < 0.8 * growth[1], growth
    out = capsys.readouterr().out
    assert "Projected(Lion): 3 scale-invariant kernels" in out
    assert "test accuracy:" in out
