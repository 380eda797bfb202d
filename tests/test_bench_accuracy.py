"""benchmarks/bench_accuracy.py: its --quick run writes a complete JSON (the
protocol's fields, the chosen rates, per-epoch norms, effective steps and
times) and a figure; --data reads CIFAR-10 arrays from a .npz and nothing else.
Accuracy is not checked: two epochs on 1,000 signals say nothing about it."""

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from _processes import only_in_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "bench_accuracy.py")


def _load():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)  # it imports _common and bench_train
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The subprocess picks its own backend (--backend jax, the benchmark's
# default): once per CI run is enough.
@only_in_pass("jax")
def test_quick_run_records_the_protocol_norms_and_times(tmp_path):
    pytest.importorskip("mnist1d", reason="pip install '.[bench]' (MNIST-1D)")
    pytest.importorskip("matplotlib", reason="pip install '.[bench]' (the figures)")
    env = dict(os.environ, KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--backend", "jax", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "resnet1d_bn.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "results.json").read_text())
    settings = result["settings"]
    assert result["dataset"].startswith("mnist1d")
    assert settings["groups"] == [["AdamW", "AdamP"]]
    assert result["wall_s"] > 0 and result["machine"]["backend"] == "jax"
    model = result["results"]["resnet1d_bn"]
    epochs, seeds = settings["epochs"], settings["seeds"]
    for name in ("AdamW", "AdamP"):
        runs = model["runs"][name]
        grid = settings["grids"][name]
        assert [r["lr"] for r in runs["search"]] == grid
        assert runs["lr"] in grid
        assert [r["seed"] for r in runs["seeds"]] == list(range(seeds))
        for run in runs["search"] + runs["seeds"]:
            per_epoch = run["epochs"]
            for key in ("acc", "train_s", "loss", "norm", "effective_step"):
                assert len(per_epoch[key]) == epochs, key
                assert all(math.isfinite(v) for v in per_epoch[key]), key
            assert 0 <= run["acc"] <= 1 and run["acc"] == per_epoch["acc"][-1]
            assert run["tracked_kernels"] >= 2  # the convs before BatchNorm
            assert all(n > 0 for n in per_epoch["norm"]) and run["initial_norm"] > 0
            assert per_epoch["effective_step"][-1] > 0  # the kernels moved
            times = per_epoch["train_s"]
            assert times[0] > 0 and all(b > a for a, b in itertools.pairwise(times))
        # The first run of each (rate, schedule) compiles; the next reuses it.
        assert runs["seeds"][0]["compile_s"] > 0 and runs["seeds"][1]["compile_s"] == 0
        row = model["table"][name]
        assert row["n"] == seeds and row["lr"] == runs["lr"]
        assert row["mean"] == pytest.approx(np.mean([r["acc"] for r in runs["seeds"]]))
    (comparison,) = model["comparisons"]
    assert (comparison["baseline"], comparison["optimizer"]) == ("AdamW", "AdamP")
    assert len(comparison["diffs"]) == seeds
    assert comparison["mean"] == pytest.approx(np.mean(comparison["diffs"]))


def test_cifar10_arrays_are_read_from_the_npz_and_normalized(tmp_path):
    bench = _load()
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, (6, 1)),
        "x_test": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, (4,)),
    }
    np.savez(tmp_path / "cifar10.npz", **arrays)
    x, y, x_test, y_test = bench.cifar10_data(str(tmp_path))  # the folder
    assert x.shape == (6, 32, 32, 3) and x_test.shape == (4, 32, 32, 3)
    assert y.shape == (6,) and y_test.shape == (4,)
    np.testing.assert_array_equal(y, arrays["y_train"][:, 0])
    # Per channel, the training images are standardized.
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1, atol=1e-3)
    model = bench.resnet20_cifar()
    assert model.output_shape == (None, 10)

    del arrays["y_test"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(SystemExit, match="y_test"):
        bench.cifar10_data(str(tmp_path / "partial.npz"))
    with pytest.raises(SystemExit, match="nothing is downloaded"):
        bench.cifar10_data(str(tmp_path / "missing"))
