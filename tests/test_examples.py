"""Smoke tests of examples/: tiny runs, their outputs, the strategy choice."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from _processes import only_in_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)  # norm_growth imports train_resnet
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------ paper_toys (any backend)


def _needs_matplotlib():
    # matplotlib comes with the `examples` extra; the `test` extra may lack it.
    pytest.importorskip("matplotlib", reason="pip install '.[examples]' for the plots")


def test_paper_toys_norms_and_plots(tmp_path, capsys):
    _needs_matplotlib()
    toys = _load("paper_toys")
    table = toys.main(["--out", str(tmp_path), "--steps-2d", "150", "--steps-3d", "60"])
    for name in ("toy_2d.png", "toy_3d.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    two = table["2D"]
    for final, peak, loss in list(two.values()) + list(table["3D"].values()):
        assert math.isfinite(final) and math.isfinite(peak) and math.isfinite(loss)
    # Momentum blows the norm up (paper: 2.93 at momentum 0.9); SGDP does not.
    assert two["GD + momentum 0.9"][1] >= 2.0
    assert two["GD + momentum 0.99"][1] > two["GD + momentum 0.9"][1]
    assert two["SGDP (momentum 0.9)"][1] <= 1.2
    assert two["AdamP"][1] <= 1.2
    # Both reach the optimum's direction (loss = -cos).
    assert two["SGDP (momentum 0.9)"][2] < -0.99
    out = capsys.readouterr().out
    assert "2D toy" in out and "3D toy" in out


def test_rosenbrock_gradient_is_exact_and_tangent():
    toys = _load("paper_toys")
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = toys.from_spherical(*rng.uniform(-1, 1, 2), r=rng.uniform(0.5, 2))
        loss, grad = toys.rosenbrock_loss(w)
        assert abs(grad @ w) <= 1e-9 * np.linalg.norm(grad) * np.linalg.norm(w)
        numeric = np.array(
            [
                (toys.rosenbrock_loss(w + h)[0] - toys.rosenbrock_loss(w - h)[0]) / 2e-6
                for h in np.eye(3) * 1e-6
            ]
        )
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)
        # Scale-invariant: the same loss at 3 w.
        assert toys.rosenbrock_loss(3 * w)[0] == pytest.approx(loss)
    start = toys.W0_3D
    assert np.linalg.norm(start) == pytest.approx(1.0)
    assert np.array(toys.spherical(start)) * toys.C == pytest.approx([-2.0, 2.0])


# ------------------------------------------------------------ train_resnet (TensorFlow)


@pytest.mark.tensorflow_only
def test_strategy_without_tpu_is_default():
    train_resnet = _load("train_resnet")

    def no_tpu():
        raise ValueError("Please provide a TPU Name to connect to.")

    strategy, kind = train_resnet.select_strategy("auto", resolver_factory=no_tpu)
    assert kind == "default" and strategy.num_replicas_in_sync == 1
    # The real resolver, on a machine without TPU, also falls back.
    assert train_resnet.select_strategy("auto")[1] == "default"
    with pytest.raises(RuntimeError, match="no TPU"):
        train_resnet.select_strategy("tpu", resolver_factory=no_tpu)
    assert train_resnet.select_strategy("default")[1] == "default"


@pytest.mark.tensorflow_only
def test_strategy_uses_a_found_tpu():
    train_resnet = _load("train_resnet")
    import tensorflow as tf

    seen = []

    class FakeResolver:
        def master(self):
            return "grpc://10.0.0.2:8470"

    def connect(resolver):
        seen.append(resolver)
        raise tf.errors.UnavailableError(None, None, "TPU unreachable")

    factory = FakeResolver
    original = tf.config.experimental_connect_to_cluster
    tf.config.experimental_connect_to_cluster = connect
    try:
        # Found but unreachable: tried, then the default strategy.
        assert train_resnet.select_strategy("auto", factory)[1] == "default"
    finally:
        tf.config.experimental_connect_to_cluster = original
    assert len(seen) == 1 and isinstance(seen[0], FakeResolver)


@pytest.mark.tensorflow_only
def test_train_resnet_tiny_run_in_process(tmp_path, capsys):
    train_resnet = _load("train_resnet")
    save = tmp_path / "model.keras"
    logdir = tmp_path / "logs"
    r = train_resnet.main(
        [
            "--epochs",
            "2",
            "--steps-per-epoch",
            "3",
            "--batch-size",
            "16",
            "--verbose",
            "0",
            "--save",
            str(save),
            "--logdir",
            str(logdir),
        ]
    )
    out = capsys.readouterr().out
    assert "strategy: default" in out and "on digits (16, 16, 1)" in out
    acc = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    norm = float(re.search(r"kernels: [0-9.]+ -> ([0-9.]+)", out).group(1))
    assert 0.0 <= acc <= 1.0 and math.isfinite(norm) and norm > 0
    assert r["optimizer"] == "sgdp"
    # ResNet-20: 21 convolutions + BN are scale-invariant, the head is not.
    assert r["scale_invariant_kernels"] == 21 and r["kernels"] == 22
    assert len(r["norms"]) == 2 and all(np.isfinite(r["effective_steps"]))
    assert save.stat().st_size > 0
    assert os.listdir(logdir / "train")
    import keras

    import keras_adamp

    loaded = keras.saving.load_model(str(save))
    assert isinstance(loaded.optimizer, keras_adamp.SGDP)


@pytest.mark.tensorflow_only
def test_make_optimizer_paper_settings():
    train_resnet = _load("train_resnet")
    import keras

    import keras_adamp

    sgdp = train_resnet.make_optimizer("sgdp", 100)
    assert isinstance(sgdp, keras_adamp.SGDP)
    assert sgdp.momentum == 0.9 and sgdp.nesterov and sgdp.weight_decay == 1e-5
    assert float(sgdp.learning_rate) == pytest.approx(0.1)  # schedule at step 0
    adamp = train_resnet.make_optimizer("adamp", 100)
    assert isinstance(adamp, keras_adamp.AdamP) and adamp.weight_decay == 1e-2
    sgd = train_resnet.make_optimizer("sgd", 100)
    # SGDP's decay 1e-5 / (1 - 0.9), as Keras's decoupled decay.
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.weight_decay == pytest.approx(
        1e-4
    )
    assert train_resnet.cifar_resnet(56, (8, 8, 3), 10).count_params() > 8e5


@pytest.mark.tensorflow_only
def test_train_resnet_mirrored_over_two_logical_cpus(tmp_path):
    # Logical devices must be configured before TF initialises: a fresh process.
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "train_resnet.py"),
            "--cpu-replicas",
            "2",
            "--strategy",
            "mirrored",
            "--dataset",
            "synthetic",
            "--model",
            "resnet8",
            "--image-size",
            "8",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "4",
            "--verbose",
            "0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy: mirrored (2 replica(s)), global batch 8" in result.stdout
    assert "test accuracy:" in result.stdout
    assert "(9 of 10 kernels flagged" in result.stdout
    norm = float(re.search(r"kernels: [0-9.]+ -> ([0-9.]+)", result.stdout).group(1))
    assert math.isfinite(norm)


@pytest.mark.tensorflow_only
def test_norm_growth_tiny_run(tmp_path, capsys):
    _needs_matplotlib()
    norm_growth = _load("norm_growth")
    results = norm_growth.main(
        [
            "--out",
            str(tmp_path),
            "--optimizers",
            "sgd,sgdp",
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
    assert (tmp_path / "norm_growth.png").stat().st_size > 10_000
    assert set(results) == {"sgd", "sgdp"}
    for r in results.values():
        assert len(r["norms"]) == 2
        assert np.all(np.isfinite(r["norms"])) and np.all(
            np.isfinite(r["effective_steps"])
        )
    out = capsys.readouterr().out
    assert "SGDP" in out and "growth" in out


# ------------------------------------------------- train_resnet on two processes

# Runs the example's main() unchanged in each process, then writes that
# process's final trainable ("t0", ...) and other ("n0", ...) weights.
_RUN_EXAMPLE = (
    "import sys, numpy as np, keras; sys.path[:0] = [sys.argv[1]]; "
    "import train_resnet; m = train_resnet.main(sys.argv[3:])['model']; "
    "np.savez(sys.argv[2], "
    "**{f't{i}': keras.ops.convert_to_numpy(w) for i, w in enumerate(m.trainable_weights)}, "
    "**{f'n{i}': keras.ops.convert_to_numpy(w) for i, w in enumerate(m.non_trainable_weights)})"
)
_TINY = [
    "--dataset",
    "synthetic",
    "--model",
    "resnet8",
    "--image-size",
    "8",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "2",
    "--batch-size",
    "4",
    "--verbose",
    "0",
]


def _example_on_two_processes(tmp_path, backend, cluster_env):
    """Starts the example in two local processes; returns their stdouts and
    final weights."""
    from _processes import launch
    from _processes import worker_env

    envs = [dict(worker_env(backend), **cluster_env(i)) for i in range(2)]
    save = tmp_path / "model.keras"
    logs = launch(
        lambda i: [
            sys.executable,
            "-c",
            _RUN_EXAMPLE,
            EXAMPLES,
            str(tmp_path / f"weights{i}.npz"),
            *_TINY,
            "--save",
            str(save),
        ],
        envs,
        str(tmp_path),
        timeout=420,
    )
    weights = []
    for i in range(2):
        with np.load(tmp_path / f"weights{i}.npz") as saved:
            weights.append({name: saved[name] for name in saved.files})
    return logs, weights, save


def _assert_trained_alike(logs, weights, save, kind, statistics_shared):
    """Both processes trained the same weights. BatchNorm's batch statistics
    are per worker under MultiWorkerMirroredStrategy, so its moving averages
    differ between workers there (and two workers need not equal one
    process); with keras.distribution they are the global batch's."""
    for log in logs:
        assert f"strategy: {kind} (2 replica(s), 2 processes), global batch 8" in log
        assert "test accuracy:" in log
    assert "saved:" in logs[0] and "saved:" not in logs[1]  # the chief writes
    assert save.stat().st_size > 0
    assert weights[0].keys() == weights[1].keys()
    assert (
        sum(name.startswith("t") for name in weights[0]) == 29
    )  # 9 convs, 9 BNs (gamma, beta), the head
    for name, value in weights[0].items():
        if name.startswith("t") or statistics_shared:
            np.testing.assert_array_equal(value, weights[1][name], err_msg=name)
    norms = [
        float(re.search(r"kernels: [0-9.]+ -> ([0-9.]+)", log).group(1)) for log in logs
    ]
    assert norms[0] == norms[1] and math.isfinite(norms[0])


@only_in_pass("tensorflow")
def test_train_resnet_two_workers_from_tf_config(tmp_path):
    import json

    from _processes import free_ports

    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]

    def tf_config(i):
        return {
            "TF_CONFIG": json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            )
        }

    logs, weights, save = _example_on_two_processes(tmp_path, "tensorflow", tf_config)
    _assert_trained_alike(logs, weights, save, "multi_worker", statistics_shared=False)


@only_in_pass("jax")
def test_train_resnet_two_jax_processes_from_keras_distribution_env(tmp_path):
    from _processes import free_ports

    coordinator = f"127.0.0.1:{free_ports(1)[0]}"

    def keras_env(i):
        return {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": coordinator,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
            "KERAS_DISTRIBUTION_PROCESS_ID": str(i),
        }

    logs, weights, save = _example_on_two_processes(tmp_path, "jax", keras_env)
    _assert_trained_alike(logs, weights, save, "data_parallel", statistics_shared=True)


def test_tf_config_workers_counts_the_cluster():
    train_resnet = _load("train_resnet")
    assert train_resnet.tf_config_workers({}) == 0
    two = '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}'
    assert train_resnet.tf_config_workers({"TF_CONFIG": two}) == 2
    chief = '{"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}}'
    assert train_resnet.tf_config_workers({"TF_CONFIG": chief}) == 3
