"""A whole train step compiled with XLA (jit_compile=True, which is what
TPUStrategy does to every step) on a BatchNorm ResNet block: it compiles once,
not once per step, and trains as the uncompiled step does.

Runs on TensorFlow (tf.function(jit_compile=True)) and JAX (jax.jit); on torch
jit_compile means torch.compile, not XLA, and is skipped."""

import keras
import numpy as np
import pytest
from _data import digits

from keras_adamp import SGDP
from keras_adamp import AdamP

pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="jit_compile=True on torch is torch.compile, not XLA",
)


def counting(cls):
    """`cls` counting its per-variable updates (`_assign`, once per variable
    and step). Under a compiled step the Python body runs only while
    tracing, so calls / variables = number of traces."""

    class Counting(cls):
        calls = 0

        def _assign(self, *args):
            type(self).calls += 1
            super()._assign(*args)

    return Counting


OPTIMIZERS = {
    "adamp": lambda cls=AdamP: cls(learning_rate=0.01, weight_decay=0.01),
    "sgdp": lambda cls=SGDP: cls(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
    ),
}


def resnet_block_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    shortcut = x
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(y)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def train(optimizer, jit_compile, x, y):
    model = resnet_block_model()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    return model, history.history["loss"]


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_xla_train_step_traces_once_and_trains_like_uncompiled(optimizer_name):
    x, y = digits(256)  # 8 full batches: no smaller last batch to retrace for
    cls = counting(AdamP if optimizer_name == "adamp" else SGDP)
    model, losses = train(OPTIMIZERS[optimizer_name](cls), True, x, y)
    num_variables = len(model.trainable_variables)
    assert int(model.optimizer.iterations) == 24
    # The step is traced a fixed number of times, not once per step (eager
    # would give 24 x variables): once under jax.jit; twice by Keras's
    # TensorFlow trainer with jit_compile=True, as for Keras's own Adam
    # (measured: same counts for keras.optimizers.Adam).
    expected_traces = 2 if keras.backend.backend() == "tensorflow" else 1
    assert cls.calls == expected_traces * num_variables, (cls.calls, num_variables)
    # More steps reuse the compiled step.
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 32
    assert cls.calls == expected_traces * num_variables

    assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) < 0), losses
    # the uncompiled step (TF graph or JAX eager) gives the same weights, up
    # to float reordering by XLA (JAX: 4e-5 of the largest weight after 32 steps)
    reference, _ = train(OPTIMIZERS[optimizer_name](), False, x, y)
    reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-4 * np.abs(b).max())
