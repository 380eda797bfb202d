"""Keras optimizer features inside model.fit (compiled train step), on every
backend: gradient accumulation, EMA with overwrite, learning-rate schedules,
global_clipnorm."""

import keras
import numpy as np
import pytest
from _data import digits

from keras_adamp import SGDP
from keras_adamp import AdamP

OPTIMIZERS = {
    "adamp": lambda **kw: AdamP(learning_rate=0.01, weight_decay=0.01, **kw),
    "sgdp": lambda **kw: SGDP(
        learning_rate=0.05, momentum=0.9, weight_decay=1e-3, **kw
    ),
}


def data(n=128):
    return digits(n, flat=True)


def layernorm_model():
    # LayerNorm: per-sample normalisation, so a batch split in two gives the
    # same mean gradient (BatchNorm statistics would differ)
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(10),
        ]
    )


def fit(optimizer, batch_size, epochs=2, callbacks=()):
    x, y = data()
    model = layernorm_model()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model, history.history["loss"]


def assert_weights_close(a, b, tol=1e-5):
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=0, atol=tol * max(np.abs(v).max(), 1))


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_gradient_accumulation_equals_the_larger_batch(optimizer_name):
    make = OPTIMIZERS[optimizer_name]
    accumulated, _ = fit(make(gradient_accumulation_steps=2), batch_size=16)
    large, _ = fit(make(), batch_size=32)
    # 128 samples x 2 epochs: 16 micro-batches, 8 updates (AdamP's bias
    # correction counts updates)
    assert int(accumulated.optimizer.iterations) == 8
    assert int(large.optimizer.iterations) == 8
    assert_weights_close(accumulated.get_weights(), large.get_weights())
    # and it is not the small-batch training
    small, _ = fit(make(), batch_size=16)
    with pytest.raises(AssertionError):
        assert_weights_close(accumulated.get_weights(), small.get_weights())


class RecordWeights(keras.callbacks.Callback):
    """After each step: (step count, weights, EMA variables or None)."""

    def __init__(self):
        super().__init__()
        self.after_step = []

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        numpy = keras.ops.convert_to_numpy
        averages = getattr(optimizer, "_model_variables_moving_average", None)
        self.after_step.append(
            (
                int(optimizer.iterations),
                [numpy(v) for v in self.model.trainable_variables],
                [numpy(v) for v in averages] if averages else None,
            )
        )


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_ema_with_overwrite_in_fit(optimizer_name):
    momentum, every = 0.9, 3
    record = RecordWeights()
    model, losses = fit(
        OPTIMIZERS[optimizer_name](
            use_ema=True, ema_momentum=momentum, ema_overwrite_frequency=every
        ),
        batch_size=16,
        callbacks=[record],
    )
    assert np.all(np.isfinite(losses))
    assert [step for step, _, _ in record.after_step] == list(range(1, 17))
    previous = None
    for step, weights, ema in record.after_step:
        if step % every == 0:
            # overwrite step: the model now holds the moving average
            for w, e in zip(weights, ema):
                np.testing.assert_array_equal(w, e)
        else:
            if previous is not None:  # the model keeps its raw weights
                assert any(np.abs(w - e).max() > 0 for w, e in zip(weights, ema))
            # ema = w after the first step, then m * ema + (1 - m) * w
            expected = (
                weights
                if previous is None
                else [
                    momentum * p + (1 - momentum) * w for p, w in zip(previous, weights)
                ]
            )
            assert_weights_close(ema, expected, 1e-6)
        previous = ema
    # At the end of fit the model holds the average (finalize_variable_values).
    assert_weights_close(model.get_weights(), record.after_step[-1][2], 1e-7)


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_learning_rate_schedule_drives_the_compiled_step(optimizer_name):
    """A schedule that drops the rate to 0 after 6 steps (it is evaluated at
    the step count before the step: 0..5 <= boundary 5): the weights move
    during those 6 steps and never after (decay is scaled by the rate too)."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.02, 0.0])
    record = RecordWeights()
    optimizer = OPTIMIZERS[optimizer_name]()
    optimizer = type(optimizer)(**{**optimizer.get_config(), "learning_rate": schedule})
    fit(optimizer, batch_size=16, callbacks=[record])
    steps = {step: weights for step, weights, _ in record.after_step}
    for step in range(2, 7):
        moved = max(np.abs(a - b).max() for a, b in zip(steps[step], steps[step - 1]))
        assert moved > 1e-4, step
    for step in range(7, 17):
        for a, b in zip(steps[step], steps[6]):
            np.testing.assert_array_equal(a, b)
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == 0.0


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_global_clipnorm_in_fit_equals_stepping_with_clipped_gradients(
    optimizer_name,
):
    """A linear model under MSE has an analytic gradient, so the fit can be
    replayed with NumPy gradients clipped by their global norm."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 5)).astype("float32")
    y = rng.standard_normal((64, 3)).astype("float32") * 10
    clip = 0.5
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    w0 = [w.copy() for w in model.get_weights()]
    model.compile(
        optimizer=OPTIMIZERS[optimizer_name](global_clipnorm=clip), loss="mse"
    )
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)

    kernel, bias = keras.Variable(w0[0]), keras.Variable(w0[1])
    replay = OPTIMIZERS[optimizer_name]()
    replay.build([kernel, bias])
    clipped_steps = 0
    for _ in range(2):
        for i in range(0, 64, 16):
            xb, yb = x[i : i + 16].astype("float64"), y[i : i + 16]
            k = keras.ops.convert_to_numpy(kernel).astype("float64")
            b = keras.ops.convert_to_numpy(bias).astype("float64")
            residual = xb @ k + b - yb
            scale = 2.0 / residual.size  # d mean((xk + b - y)^2)
            grads = [scale * xb.T @ residual, scale * residual.sum(0)]
            norm = np.sqrt(sum(np.sum(g**2) for g in grads))
            if norm > clip:
                clipped_steps += 1
                grads = [g * clip / norm for g in grads]
            replay.apply(
                [keras.ops.convert_to_tensor(g.astype("float32")) for g in grads],
                [kernel, bias],
            )
    assert clipped_steps == 8  # clipping acted at every step
    for a, b in zip(model.get_weights(), [kernel, bias]):
        np.testing.assert_allclose(
            a, keras.ops.convert_to_numpy(b), rtol=1e-5, atol=1e-6
        )
