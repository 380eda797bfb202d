"""keras_adamp.callbacks.ScaleInvariantNormMonitor (any backend)."""

import glob
import os

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_adamp
from keras_adamp.callbacks import ScaleInvariantNormMonitor


def _model(optimizer):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(8, 3, use_bias=False, name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(3, name="head"),
        ],
        name="net",
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data(n=32):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, 6, 6, 2)).astype("float32"),
        rng.integers(0, 3, n).astype("int32"),
    )


def _kernel(model):
    return ops.convert_to_numpy(model.get_layer("conv").kernel).astype("float64")


def _unit(w):
    return w / np.linalg.norm(w)


def test_logs_exact_norm_and_effective_step():
    x, y = _data(8)
    model = _model(keras_adamp.SGDP(0.5, momentum=0.9))
    monitor = ScaleInvariantNormMonitor(variables="conv/kernel", every_n_steps=1)
    w0 = _kernel(model)
    history = model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[monitor], verbose=0
    )
    w1 = _kernel(model)
    assert monitor.tracked_paths == ["net/conv/kernel"]
    assert monitor.initial_norm == pytest.approx(np.linalg.norm(w0), rel=1e-5)
    norm = history.history["scale_invariant_norm"]
    step = history.history["scale_invariant_effective_step"]
    assert norm == pytest.approx([np.linalg.norm(w1)], rel=1e-5)
    expected = np.linalg.norm(_unit(w1) - _unit(w0))
    assert expected > 1e-3  # the step moved the direction
    assert step == pytest.approx([expected], rel=1e-3)


def test_detection_from_data_tracks_only_normalised_kernels():
    x, y = _data()
    model = _model(keras_adamp.AdamP(1e-2))
    monitor = ScaleInvariantNormMonitor(data=(x[:16], y[:16]))
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[monitor], verbose=0)
    assert monitor.tracked_paths == ["net/conv/kernel"]
    assert len(monitor.epochs["norm"]) == 2
    assert all(np.isfinite(monitor.epochs["effective_step"]))
    # Default without data: every rank >= 2 trainable variable.
    default = ScaleInvariantNormMonitor()
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[default], verbose=0)
    assert default.tracked_paths == ["net/conv/kernel", "net/head/kernel"]


def test_momentum_grows_the_norm_and_the_projection_does_not():
    # The paper's point (Lemma 2.2 vs 3.1), measured by the monitor.
    x, y = _data()
    growth = {}
    for name, optimizer in [
        ("sgd", keras.optimizers.SGD(0.5, momentum=0.9)),
        ("sgdp", keras_adamp.SGDP(0.5, momentum=0.9)),
    ]:
        model = _model(optimizer)
        monitor = ScaleInvariantNormMonitor(variables="conv/kernel")
        model.fit(
            x, y, batch_size=8, epochs=3, shuffle=False, callbacks=[monitor], verbose=0
        )
        growth[name] = monitor.epochs["norm"][-1] / monitor.initial_norm - 1
    assert growth["sgdp"] >= 0  # ||w||^2 grows by lr^2 ||u||^2: never shrinks
    assert growth["sgd"] > 3 * growth["sgdp"]


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.keys = []

    def on_train_batch_end(self, batch, logs=None):
        self.keys.append(sorted(k for k in logs if k.startswith("scale_invariant")))


def test_every_n_steps_writes_batch_logs():
    x, y = _data()
    model = _model(keras_adamp.SGDP(0.1, momentum=0.9))
    recorder = _BatchLogs()
    monitor = ScaleInvariantNormMonitor(
        variables=[model.get_layer("conv").kernel], every_n_steps=2
    )
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[monitor, recorder], verbose=0)
    keys = ["scale_invariant_effective_step", "scale_invariant_norm"]
    assert recorder.keys == [keys, [], keys, []]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_rejects_bad_every_n_steps(bad):
    with pytest.raises(ValueError, match="every_n_steps"):
        ScaleInvariantNormMonitor(every_n_steps=bad)


def test_no_variable_to_track_is_an_error():
    x, y = _data(8)
    model = _model(keras_adamp.SGDP(0.1))
    with pytest.raises(ValueError, match="no variable"):
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[ScaleInvariantNormMonitor(variables="nothing-matches")],
        )


@pytest.mark.tensorflow_only
def test_values_reach_tensorboard(tmp_path):
    x, y = _data(16)
    model = _model(keras_adamp.SGDP(0.1, momentum=0.9))
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[
            ScaleInvariantNormMonitor(variables="conv/kernel"),
            keras.callbacks.TensorBoard(str(tmp_path)),
        ],
    )
    events = glob.glob(os.path.join(str(tmp_path), "train", "events.out.tfevents*"))
    assert events
    content = b""
    for f in events:
        with open(f, "rb") as handle:
            content += handle.read()
    assert b"epoch_scale_invariant_norm" in content
    assert b"epoch_scale_invariant_effective_step" in content


def test_detection_under_mixed_float16_tracks_what_float32_would():
    # The monitor's detection is the report's: under a LossScaleOptimizer the
    # loss is scaled, so the kernel whose float16 gradient underflows is not
    # mistaken for a scale-invariant one.
    from test_diagnostics import residual_batch
    from test_diagnostics import residual_model

    x, y = residual_batch()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = residual_model()
        monitor = ScaleInvariantNormMonitor(data=(x, y))
        monitor.set_model(model)
        monitor.on_train_begin()
    finally:
        keras.config.set_dtype_policy("float32")
    assert monitor.tracked_paths == ["main/kernel"]
