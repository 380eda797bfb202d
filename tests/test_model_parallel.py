"""Model parallel on JAX: a tiny keras-hub Gemma under
`keras.distribution.ModelParallel` with `GemmaBackbone.get_layout_map` on a
2x4 mesh of 8 virtual CPU devices trains with AdamP and SGDP as on one
device, keeps every slot sharded like its variable, and XLA's SPMD
partitioner has nothing to replicate ("Involuntary full rematerialization":
it printed that for the stacked channel sums of differently sharded kernels
until they were constrained to be replicated).

One subprocess (the virtual devices must be set before JAX starts), in the
JAX pass of the suite only: it sets its own backend."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _processes import only_in_pass
from _processes import worker_env

pytest.importorskip("keras_hub")

WORKER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "_model_parallel_worker.py"
)
RTOL = 1e-5


def max_relative_error(actual, expected):
    return max(
        np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)
        for a, e in zip(actual, expected)
    )


def load(path):
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@only_in_pass("jax")
def test_gemma_model_parallel_on_a_2x4_mesh_equals_one_device(tmp_path):
    env = worker_env("jax")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, WORKER, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "Involuntary full rematerialization" not in log, log[-5000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    for name in ("adamp", "sgdp"):
        variables = facts[name]
        # The layout map shards the kernels and the embedding on both mesh
        # axes; each slot (AdamP's two moments, SGDP's buffer) like its
        # variable.
        sharded = [p for p, v in variables.items() if v["devices"] == 8]
        assert any(p.endswith("query/kernel") for p in sharded)
        assert variables["token_embedding/embeddings"]["spec"] == ["model", "batch"]
        assert variables["decoder_block_0/attention/query/kernel"]["spec"] == [
            "model",
            "batch",
            None,
        ]
        slots_per_variable = 2 if name == "adamp" else 1
        for path, v in variables.items():
            assert v["slots"] == [v["spec"]] * slots_per_variable, (name, path)
        single = load(tmp_path / f"{name}_single.npz")
        parallel = load(tmp_path / f"{name}_parallel.npz")
        assert max_relative_error(parallel, single) <= RTOL, name
        assert max_relative_error(single, load(tmp_path / "initial.npz")) > 1e-4
