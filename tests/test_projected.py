"""`keras_adamp.Projected`: AdamP's projection on any Keras optimizer's update.

Equivalence: Projected(AdamW) follows AdamP and Projected(SGD, Nesterov)
follows SGDP with the same settings, where Keras's conventions and the
reference's agree (see `equivalent`); the wrapper in every compiled mode; the
errors that say what to do instead; mixed precision, sparse gradients,
MirroredStrategy, stateless_apply; saving; diagnostics; the short names."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_adamp import SGDP
from keras_adamp import AdamP
from keras_adamp import Projected

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (shape, channel axes of the gradient's orthogonality: "channel"
# makes every output channel of the gradient orthogonal to the weight (the
# channel-wise view passes), "layer" only the whole tensor (the layer-wise
# view passes), None an ordinary gradient, correlated with the weight (no
# view passes)). Biases and rank-1 variables are never projected.
VARIABLES = {
    "conv/kernel": ((3, 3, 4, 8), "channel"),
    "dense/kernel": ((16, 8), "channel"),
    "depthwise/kernel": ((3, 3, 4, 1), "channel"),
    "dense_layer/kernel": ((12, 6), "layer"),
    "head/kernel": ((8, 5), None),
    "head/bias": ((5,), None),
    "norm/gamma": ((8,), None),
}
STEPS = 20


def make_variables():
    rng = np.random.default_rng(0)
    out = []
    for path, (shape, _) in VARIABLES.items():
        value = rng.normal(size=shape).astype("float32")
        out.append(keras.Variable(value, name=path.replace("/", "_")))
    return out


def _channel_axes(shape):
    """Output axes as the package's static rules see these shapes."""
    if len(shape) == 4 and shape[-1] == 1:  # depthwise, multiplier 1
        return (2, 3)
    return (len(shape) - 1,)


def gradients(values, noise):
    """Per variable a gradient from `noise`, made orthogonal to the weight
    per output channel, per tensor, or correlated with it (keras.ops, so
    that it compiles with the step)."""
    grads = []
    for (shape, kind), w, r in zip(VARIABLES.values(), values, noise):
        if kind is None:
            grads.append(r + 0.5 * w)
            continue
        if kind == "channel":
            axes = tuple(a for a in range(len(shape)) if a not in _channel_axes(shape))
        else:
            axes = tuple(range(len(shape)))
        wr = ops.sum(w * r, axis=axes, keepdims=True)
        ww = ops.sum(w * w, axis=axes, keepdims=True)
        grads.append(r - w * wr / ww)
    return grads


def noise_sequence(steps=STEPS):
    rng = np.random.default_rng(1)
    return [
        [rng.normal(size=shape).astype("float32") for shape, _ in VARIABLES.values()]
        for _ in range(steps)
    ]


def run(optimizer, mode, steps=STEPS):
    """The weights after `steps` steps of `optimizer` (mode: "eager",
    "function", "xla" on TF; "jit" on JAX: stateless_apply under jax.jit;
    "eager" elsewhere)."""
    variables = make_variables()
    optimizer.build(variables)
    sequence = noise_sequence(steps)
    if mode == "jit":
        import jax

        @jax.jit
        def step(train, opt, noise):
            grads = gradients(train, noise)
            return optimizer.stateless_apply(opt, grads, train)

        train = [v.value for v in variables]
        opt = [v.value for v in optimizer.variables]
        for noise in sequence:
            train, opt = step(train, opt, noise)
        return [np.asarray(x) for x in train]

    def step(noise):
        values = [ops.stop_gradient(v.value) for v in variables]
        noise = [ops.convert_to_tensor(r) for r in noise]
        optimizer.apply(gradients(values, noise), variables)

    if mode in ("function", "xla"):
        import tensorflow as tf

        step = tf.function(step, jit_compile=mode == "xla")
    for noise in sequence:
        step(noise)
    return [ops.convert_to_numpy(v) for v in variables]


MODES = {
    "tensorflow": ["eager", "function", "xla"],
    "jax": ["eager", "jit"],
    "torch": ["eager"],
}[BACKEND]

# Where the conventions differ, the settings make them agree:
# - Adam's epsilon: Keras adds it to sqrt(v) before the bias correction,
#   AdamP after; with gradients of order 1 an epsilon of 1e-8 is below
#   float32 rounding either way.
# - SGD's momentum: Keras keeps the learning rate inside the buffer, SGDP
#   outside; equal under a constant learning rate (used here).
# - Decay: Keras decays by lr * weight_decay, SGDP by lr * weight_decay /
#   (1 - momentum): SGDP gets weight_decay * (1 - momentum).
PAIRS = {
    "adamw": (
        lambda: Projected(
            keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.05, epsilon=1e-8)
        ),
        lambda: AdamP(learning_rate=0.01, weight_decay=0.05, epsilon=1e-8),
        lambda: keras.optimizers.AdamW(
            learning_rate=0.01, weight_decay=0.05, epsilon=1e-8
        ),
    ),
    "sgd_nesterov": (
        lambda: Projected(
            keras.optimizers.SGD(
                learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.05
            )
        ),
        lambda: SGDP(
            learning_rate=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.05 * (1 - 0.9),
        ),
        lambda: keras.optimizers.SGD(
            learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=0.05
        ),
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_projected_keras_optimizer_follows_its_keras_adamp_counterpart(pair, mode):
    wrapped, reference, plain = PAIRS[pair]
    got = run(wrapped(), mode)
    want = run(reference(), mode)
    unprojected = run(plain(), mode)
    for path, g, w, u in zip(VARIABLES, got, want, unprojected):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=path)
        kind = VARIABLES[path][1]
        if kind is not None:
            # The projection fired: the plain optimizer's weight is elsewhere.
            assert np.max(np.abs(u - w)) > 1e-3, path
        else:
            # Never projected, or not this time: exactly the inner's step.
            np.testing.assert_array_equal(g, u, err_msg=path)
