"""AdamP on each Keras backend: what only some backends have (JAX sharding,
torch devices) and moving a trained model between backends.

Anything that needs another backend, or JAX with two host devices, runs in a
subprocess (tests/_backend_worker.py) whose KERAS_BACKEND names it, so every
test here runs (none is skipped) whichever backend runs the suite. The
cross-backend tests start from the backend this process runs, so the CI
matrix (TensorFlow, JAX, torch runs) covers every direction once.
"""

import importlib.util
import json
import os
import subprocess
import sys

import _backend_worker as worker
import keras
import numpy as np
import pytest

from keras_adamp import projection

BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_MODULE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
CURRENT = keras.backend.backend()
RTOL = 1e-5
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_backend_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_backend(name):
    if importlib.util.find_spec(BACKEND_MODULE[name]) is None:
        message = f"backend {name} not installed; pip install '.[{name}]'"
        if os.environ.get("KERAS_ADAMP_REQUIRE_ORACLE") == "1":
            pytest.fail(f"KERAS_ADAMP_REQUIRE_ORACLE=1 (CI) but {message}")
        pytest.skip(message)


def run_worker(command, workdir, backend, **env):
    require_backend(backend)
    environment = dict(os.environ, KERAS_BACKEND=backend, **env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH")])
    )
    result = subprocess.run(
        [sys.executable, WORKER, command, str(workdir)],
        env=environment,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"{command} on {backend} failed:\n{result.stderr[-4000:]}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_relative_error(actual, expected):
    assert len(actual) == len(expected)
    return max(
        np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)
        for a, e in zip(actual, expected)
    )


# --- a model saved on one backend resumes on another -----------------------------


@pytest.mark.parametrize(
    "destination", [b for b in BACKENDS if b != CURRENT], ids=lambda b: f"to_{b}"
)
def test_saved_model_resumes_on_another_backend_as_on_this_one(destination, tmp_path):
    x, y = worker.data()
    net = worker.compile_adamp(worker.model())
    net.fit(x, y, **worker.FIT)
    net.save(tmp_path / "model.keras")
    state = worker.to_numpy(net.optimizer.variables)
    worker.save_arrays(tmp_path / "state.npz", state)
    assert any(np.any(s != 0) for s in state[1:]), "no optimizer state to carry"
    net.fit(x, y, **worker.FIT)  # continue on this backend
    expected = worker.to_numpy(net.weights)

    facts = run_worker("resume", tmp_path, destination)

    assert facts["backend"] == destination
    assert facts["optimizer"] == "AdamP"
    assert facts["state_arrays"] == len(state)
    assert facts["iterations"] == int(
        keras.ops.convert_to_numpy(net.optimizer.iterations)
    )
    resumed = worker.load_arrays(tmp_path / "resumed.npz")
    assert max_relative_error(resumed, expected) <= RTOL


def test_resume_check_detects_lost_optimizer_state(tmp_path):
    """Guards the test above: training on from the same weights with fresh
    AdamP state ends measurably elsewhere than resuming with the saved one."""
    x, y = worker.data()
    net = worker.compile_adamp(worker.model())
    net.fit(x, y, **worker.FIT)
    weights = net.get_weights()
    net.fit(x, y, **worker.FIT)
    fresh = worker.compile_adamp(worker.model())
    fresh.set_weights(weights)
    fresh.fit(x, y, **worker.FIT)
    assert max_relative_error(fresh.get_weights(), net.get_weights()) > 100 * RTOL


# --- JAX --------------------------------------------------------------------------

TWO_HOST_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def test_jax_fit_with_jit_compile_traces_the_step_once(tmp_path):
    facts = run_worker("jax_jit_traces", tmp_path, "jax")
    batches = facts["batches"]
    jitted, eager = facts["jit_True"], facts["jit_False"]
    assert jitted["model_jit_compile"] is True and eager["model_jit_compile"] is False
    # jax.jit: traced once, on tracers; without: every batch, on arrays.
    assert jitted["calls"] == jitted["variables"] == jitted["tracer_calls"]
    assert eager["calls"] == batches * eager["variables"]
    assert eager["tracer_calls"] == 0
    for run in (jitted, eager):
        assert run["iterations"] == batches and run["loss_finite"]


def test_jax_data_parallel_over_two_devices_equals_one_device(tmp_path):
    facts = run_worker("data_parallel", tmp_path, "jax", **TWO_HOST_DEVICES)
    assert facts["jax_devices"] == 2
    # Replicated on both devices: the state really was distributed.
    assert facts["kernel_devices"] == 2
    assert facts["slot_devices"] == 2
    single = worker.load_arrays(tmp_path / "single.npz")
    parallel = worker.load_arrays(tmp_path / "parallel.npz")
    assert max_relative_error(parallel, single) <= RTOL


def test_jax_model_parallel_sharded_on_output_channels(tmp_path):
    facts = run_worker("model_parallel", tmp_path, "jax", **TWO_HOST_DEVICES)
    assert facts["kernel_spec"] == [None, "model"]
    assert facts["kernel_devices"] == 2
    assert facts["momentum_spec"] == [None, "model"]
    expected = {
        "channel": projection.CHANNEL_WISE,
        "layer": projection.LAYER_WISE,
        "none": projection.NOT_PROJECTED,
    }
    for branch, (sharded, plain) in facts["decisions"].items():
        assert plain == expected[branch], branch
        assert sharded == plain, branch
    single = worker.load_arrays(tmp_path / "single.npz")
    parallel = worker.load_arrays(tmp_path / "parallel.npz")
    assert max_relative_error(parallel, single) <= RTOL


# --- PyTorch ----------------------------------------------------------------------


def test_torch_fit_keeps_optimizer_state_on_the_variables_device(tmp_path):
    facts = run_worker("torch_state_device", tmp_path, "torch")
    # Both slots of every variable are torch tensors on its device, of its
    # dtype (the device part only bites on a GPU; CI has CPUs only).
    assert facts["slots"] == 2 * facts["variables"] > 0
    assert facts["mismatches"] == []
    assert facts["iterations_on_variable_device"]
    assert facts["loss_finite"]
