"""Smoke test of examples/spherical.py: a tiny run."""

import keras
import numpy as np
import pytest
from test_examples import _load
from test_examples import _needs_matplotlib


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the example runs on every backend, but one tiny run (on "
    "TensorFlow) is enough for CI; its optimizers are tested on all three",
)
def test_spherical_example_tiny_run(tmp_path, capsys):
    _needs_matplotlib()
    pytest.importorskip("tensorflow", reason="the example resizes with TensorFlow")
    example = _load("spherical")
    results = example.main(
        [
            "--out",
            str(tmp_path),
            "--optimizers",
            "adamsrt,sgdmrt",
            "--dataset",
            "synthetic",
            "--model",
            "resnet8",
            "--image-size",
            "8",
            "--epochs",
            "2",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "8",
        ]
    )
    assert (tmp_path / "spherical.png").stat().st_size > 10_000
    assert list(results) == ["adamsrt", "sgdmrt"]
    for r in results.values():
        # ResNet-8: 9 convolutions, each followed by BatchNorm; not the head.
        assert r["kernels"] == 9
        assert len(r["norms"]) == 2 and np.all(np.isfinite(r["norms"]))
        assert np.all(np.isfinite(r["effective_steps"]))
        assert 0.0 <= r["test_accuracy"] <= 1.0
    # Same initial weights for everyone.
    assert len({r["initial_norm"] for r in results.values()}) == 1
    out = capsys.readouterr().out
    assert "AdamSRT" in out and "eff. step" in out
