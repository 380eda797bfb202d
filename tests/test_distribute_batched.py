"""Under tf.distribute.MirroredStrategy the projection of every variable is
decided in one call of `projection.coefficients` per replica and step (not
one per variable), with the results of one device
(tests/_batched_decision_worker.py runs it in a fresh process)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tensorflow_only

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    repo = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    env["KERAS_BACKEND"] = "tensorflow"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_batched_decision_worker.py")],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
def test_one_decision_for_all_variables_per_replica(results, optimizer_name):
    # The step is traced once; each replica decides the three kernels (the
    # rank-1 variables are never projected) in one call.
    assert results["replicas"] == 2
    assert results[optimizer_name]["calls"] == [3, 3]


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp", "adamsrt"])
def test_mirrored_steps_equal_one_device(results, optimizer_name):
    assert results[optimizer_name]["error"] <= 1e-5, results[optimizer_name]


def test_spherical_optimizers_make_no_decision(results):
    assert results["adamsrt"]["calls"] == []
