"""AdamP/SGDP inside Keras training: compile/fit, XLA, saving and resuming."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _data import conv_bn_model
from _data import digits

from keras_adamp import SGDP
from keras_adamp import AdamP

OPTIMIZERS = {
    "adamp": lambda: AdamP(learning_rate=0.01, weight_decay=0.01),
    "sgdp": lambda: SGDP(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
    ),
}


def compiled(optimizer_name, jit_compile=False, seed=0):
    model = conv_bn_model(seed)
    model.compile(
        optimizer=OPTIMIZERS[optimizer_name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def max_relative_error(actual, expected):
    return max(
        np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)
        for a, e in zip(actual, expected)
    )


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_fit_decreases_the_loss_of_a_batchnorm_cnn(optimizer_name):
    x, y = digits(1024)
    model = compiled(optimizer_name)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_jit_compile_gives_the_same_weights_as_without(optimizer_name):
    x, y = digits(192)
    results = []
    for jit_compile in (False, True):
        model = compiled(optimizer_name, jit_compile=jit_compile)
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        # XLA on TensorFlow, jax.jit on JAX, torch.compile on torch; Keras
        # turns it off (with a warning) where the backend can't.
        assert model.jit_compile is jit_compile
        results.append(model.get_weights())
    assert max_relative_error(results[1], results[0]) <= 1e-5


def _run_python(code, cwd):
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_saved_model_resumes_in_a_fresh_process_as_if_never_stopped(
    optimizer_name, tmp_path
):
    x, y = digits(256)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    fit = dict(batch_size=64, epochs=2, shuffle=False, verbose=0)

    model = compiled(optimizer_name)
    model.fit(x, y, **fit)
    model.save(tmp_path / "model.keras")
    model.fit(x, y, **fit)  # uninterrupted training, in this process
    expected = model.get_weights()
    expected_iterations = int(model.optimizer.iterations)

    output = _run_python(
        f"""
        import json
        import numpy as np
        import keras
        import keras_adamp  # registers AdamP/SGDP: no custom_objects needed

        data = np.load("data.npz")
        model = keras.saving.load_model("model.keras")
        assert type(model.optimizer).__name__ == "{type(model.optimizer).__name__}"
        model.fit(data["x"], data["y"], **{fit!r})
        np.savez("resumed.npz", *model.get_weights())
        print(json.dumps({{"iterations": int(model.optimizer.iterations)}}))
        """,
        cwd=tmp_path,
    )
    resumed = np.load(tmp_path / "resumed.npz")
    resumed = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
    assert json.loads(output.strip().splitlines()[-1])["iterations"] == (
        expected_iterations
    )
    assert max_relative_error(resumed, expected) <= 1e-6


def test_loading_needs_the_import_or_custom_objects(tmp_path):
    model = compiled("adamp")
    x, y = digits(64)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    slots = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    np.savez(tmp_path / "slots.npz", *slots)
    _run_python(
        """
        import numpy as np
        import keras

        try:
            keras.saving.load_model("model.keras")
        except Exception as error:  # without the import Keras can't find AdamP
            assert "AdamP" in str(error), error
        else:
            raise AssertionError("loaded an AdamP model without keras_adamp")

        from keras_adamp.adamp import AdamP

        model = keras.saving.load_model(
            "model.keras", custom_objects={"AdamP": AdamP}
        )
        assert isinstance(model.optimizer, AdamP)
        saved = np.load("slots.npz")
        slots = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
        assert len(slots) == len(saved.files)
        for i, slot in enumerate(slots):
            np.testing.assert_array_equal(slot, saved[f"arr_{i}"])
        """,
        cwd=tmp_path,
    )
