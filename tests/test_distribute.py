"""tf.distribute.MirroredStrategy over two logical CPU devices equals training
on one device with the same global batch (tests/_distribute_worker.py does the
training in a fresh process: the CPU can be split only before TensorFlow
initialises). jit_compile=True with MirroredStrategy fails in Keras itself
(built-in Adam too), so XLA is tested on one device in test_xla.py."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tensorflow_only

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results():
    # One subprocess runs every scenario: TensorFlow's start-up dominates.
    env = dict(os.environ)
    repo = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    env["KERAS_BACKEND"] = "tensorflow"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_distribute_worker.py")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_replicas_were_used(results):
    assert results["replicas"] == 2


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
def test_mirrored_fit_equals_single_device_fit(results, optimizer_name):
    result = results[f"fit_{optimizer_name}"]
    assert result["moved"] > 0.1  # training really changed the weights
    assert result["error"] <= 1e-5, result
    # 256 samples / global batch 32 * 2 epochs: one optimizer step per global
    # batch, not one per replica
    assert result["iterations"] == 16


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
def test_mirrored_custom_loop_equals_single_device(results, optimizer_name):
    result = results[f"custom_loop_{optimizer_name}"]
    assert result["moved"] > 0.1
    assert result["error"] <= 1e-5, result
