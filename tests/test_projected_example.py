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
    argv = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32"]
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
    # Not the same training: the projection changed the kernels.
    assert wrapped["norms"] != bare["norms"]
    out = capsys.readouterr().out
    assert "Projected(Lion): 3 scale-invariant kernels" in out
    assert "test accuracy:" in out
