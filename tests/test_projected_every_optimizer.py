"""`keras_adamp.Projected` around every optimizer Keras ships.

One small BatchNorm conv net (two bias-free convolutions, each followed by
BatchNorm: scale-invariant kernels; a Dense head with a bias) trains a few
steps on digits with each Keras optimizer, once wrapped and once not, from
the same initial weights on the same batches (on JAX through
`stateless_apply`). For every wrapped step the test checks:

* (a) on the kernels (or the channels) the projection's test flags, the step
  has no radial part: ``<w, Δw>`` is ~0 relative to ``||w|| ||Δw||`` once the
  decoupled decay ``lr * wd * wd_ratio * w`` is added back;
* (c) every variable the test does not project (biases, BatchNorm's gamma and
  beta, the head's kernel while its gradient is not orthogonal to it) is
  bit-identical to the same variable in a copy trained by the bare inner
  optimizer on the same gradients;

and at the end of the run, (b) that the scale-invariant kernels' norm grew
less wrapped than unwrapped, for the momentum-based optimizers: those whose
update carries past gradients (a first moment, Lion's and Muon's momentum,
SGD's and RMSprop's momentum, the schedule-free average), which is what
pushes ``w`` outwards in the papers' argument. Adagrad, Adadelta, Ftrl and
Keras's Adafactor (no first moment) are wrapped and checked for (a) and (c)
only: their radial part follows the current gradient instead of
accumulating (benchmarks/bench_wrapped.py measures the same norm growth
with and without the wrapper for them), and Ftrl recomputes ``w`` from its
accumulators each step.
"""

import keras
import numpy as np
import pytest
from _data import apply
from _data import conv_bn_model
from _data import digits
from keras import ops

import keras_adamp
from keras_adamp import projection
from keras_adamp.layouts import ChannelLayout
from keras_adamp.layouts import default_channel_axes

# Steps per run: the momentum-based optimizers' norm growth needs about
# 1 / (1 - beta_1) steps to build up; (c)'s copy is compared on the first
# SHADOW_STEPS (a bare optimizer's eager step is what costs here).
STEPS = 12
SHADOW_STEPS = 3
BATCH = 32
WEIGHT_DECAY = 0.05
# (a): |<w, Δw>| <= TANGENT_TOL ||w|| ||Δw|| + ROUNDING ||w||^2. Rounding
# w_after to float32 moves each element of Δw by up to 2^-24 |w_i|, hence
# <w, Δw> by up to 2^-24 ||w||^2 (ROUNDING leaves a factor 4 for the
# subtraction and the decay). The unwrapped steps of the momentum-based
# optimizers measure 1e-2 and more on the same kernels.
TANGENT_TOL = 1e-3
ROUNDING = 4 * 2.0**-24
# Projected's default wd_ratio: the decay left on a projected kernel.
WD_RATIO = 0.1

# name -> (the inner optimizer, momentum-based). Learning rates large enough
# that twelve steps move the norm measurably, small enough to stay stable.
OPTIMIZERS = {
    "Adadelta": (lambda: keras.optimizers.Adadelta(1.0), False),
    "Adafactor": (lambda: keras.optimizers.Adafactor(0.01), False),
    "Adagrad": (lambda: keras.optimizers.Adagrad(0.05), False),
    "Adam": (lambda: keras.optimizers.Adam(0.01), True),
    "AdamW": (lambda: keras.optimizers.AdamW(0.01), True),
    "Adamax": (lambda: keras.optimizers.Adamax(0.01), True),
    "Ftrl": (lambda: keras.optimizers.Ftrl(0.1), False),
    "Lamb": (lambda: keras.optimizers.Lamb(0.01), True),
    "Lion": (lambda: keras.optimizers.Lion(0.003), True),
    "Muon": (lambda: keras.optimizers.Muon(0.01), True),
    "Nadam": (lambda: keras.optimizers.Nadam(0.01), True),
    "RMSprop": (lambda: keras.optimizers.RMSprop(0.001, momentum=0.9), True),
    "SGD": (lambda: keras.optimizers.SGD(0.1, momentum=0.9), True),
    "ScheduleFreeAdamW": (lambda: keras.optimizers.ScheduleFreeAdamW(0.01), True),
}
# Keras's optimizers that take another optimizer, not a step rule.
WRAPPERS = {"LossScaleOptimizer", "MultiOptimizer", "OptimizerMap", "Optimizer"}


def _inner(name):
    optimizer = OPTIMIZERS[name][0]()
    # The same decay everywhere (Keras's default is None for most, 0.004 for
    # AdamW and Muon), large enough that (a) sees a wrong decay factor on a
    # projected kernel (wd_ratio 1 instead of 0.1 leaves |cos(w, Δw)| of
    # 3e-3 to 1 on the first step), and (c) covers it on the others. Muon
    # decays the variables it steps with AdamW (here the conv kernels,
    # BatchNorm's and the biases) by `adam_weight_decay`, the others by
    # `weight_decay`: different values, so that a wrapper must take each
    # variable's own.
    optimizer.weight_decay = WEIGHT_DECAY
    if name == "Muon":
        optimizer.adam_weight_decay = 2 * WEIGHT_DECAY
    return optimizer


def _decay(optimizer, variable):
    """The decoupled decay the bare optimizer applies to `variable`."""
    if isinstance(optimizer, keras.optimizers.Muon) and optimizer._should_use_adamw(
        variable
    ):
        return optimizer.adam_weight_decay
    return optimizer.weight_decay


def test_every_keras_optimizer_is_covered():
    shipped = {
        name
        for name in dir(keras.optimizers)
        if isinstance(getattr(keras.optimizers, name), type)
        and issubclass(getattr(keras.optimizers, name), keras.optimizers.Optimizer)
    }
    assert shipped - WRAPPERS == set(OPTIMIZERS)


# ------------------------------------------------------------------- the net


def _model():
    """The shared Conv+BatchNorm net, BatchNorm's epsilon at 1e-6: Keras's
    1e-3 is not small next to the variance of these convolutions' outputs on
    digits, which puts |cos(g, w)| of their kernels at about half the test's
    threshold (scale invariance only approximate); at 1e-6 it is ~1e-5 of
    it, and the decision is sure."""
    return conv_bn_model(seed=0, epsilon=1e-6)


def _gradient_function(model):
    """`f(x, y)` -> the gradients of the cross-entropy on one batch, compiled
    once for all the runs (the weights are arguments or read at call time)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False)
        def grads(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, [v.value for v in trainable])

        return grads
    if backend == "jax":
        import jax

        def loss_of(values, frozen, x, y):
            y_pred, _ = model.stateless_call(values, frozen, x, training=True)
            return loss_fn(y, y_pred)

        compiled = jax.jit(jax.grad(loss_of))
        frozen = [v.value for v in model.non_trainable_variables]
        return lambda x, y: compiled([v.value for v in trainable], frozen, x, y)
    import torch

    def grads(x, y):
        loss = loss_fn(y, model(x, training=True))
        values = [v.value for v in trainable]
        return [g.detach() for g in torch.autograd.grad(loss, values)]

    return grads


@pytest.fixture(scope="module")
def net():
    threads = None
    if keras.backend.backend() == "torch":
        import torch

        # Two threads on this tiny net contend with each other (and any other
        # process) on a 2-core machine: one is several times faster.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
    model = _model()
    x, y = digits(STEPS * BATCH)
    batches = [
        (
            ops.convert_to_tensor(x[i : i + BATCH]),
            ops.convert_to_tensor(y[i : i + BATCH]),
        )
        for i in range(0, STEPS * BATCH, BATCH)
    ]
    start = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    yield model, _gradient_function(model), batches, start
    if threads is not None:
        torch.set_num_threads(threads)


def _numpy(variables):
    return [ops.convert_to_numpy(v) for v in variables]


def _layout(variable):
    return ChannelLayout.create(variable.shape, default_channel_axes(variable.shape))


def _decision(w, g, layout, delta=0.1, eps=1e-8):
    """The projection's test (per channel, then the whole tensor), in float64
    NumPy; None where a cosine lies within a factor 2 of its threshold (the
    wrapper's float32 test could go either way there)."""
    w = w.astype("float64").reshape(layout.view)
    g = g.astype("float64").reshape(layout.view)

    def ratio(axes, size):
        dot = np.abs(np.sum(w * g, axis=axes))
        norms = np.sqrt(np.sum(w * w, axis=axes)) * np.sqrt(np.sum(g * g, axis=axes))
        return np.max(dot / np.maximum(norms, eps)) / (delta / np.sqrt(size))

    channel = ratio(layout.reduce_axes, layout.group_size)
    layer = ratio(tuple(range(w.ndim)), layout.numel)
    if channel < 0.5:
        return projection.CHANNEL_WISE
    if channel < 2 or 0.5 <= layer < 2:
        return None
    if layer < 0.5:
        return projection.LAYER_WISE
    return projection.NOT_PROJECTED


def _radial_parts(w, dw, layout, decision):
    """Per group of the decided view: |<w_c, Δw_c>| / (||w_c|| ||Δw_c||),
    and the same with float32 rounding's share taken off (<= 0 when the
    radial part is within rounding)."""
    w = w.astype("float64").reshape(layout.view)
    dw = dw.astype("float64").reshape(layout.view)
    if decision == projection.LAYER_WISE:
        axes = tuple(range(w.ndim))
    else:
        axes = layout.reduce_axes
    dot = np.abs(np.sum(w * dw, axis=axes))
    ww = np.sum(w * w, axis=axes)
    norms = np.maximum(np.sqrt(ww * np.sum(dw * dw, axis=axes)), 1e-30)
    return dot / norms, (dot - ROUNDING * ww) / norms


def _conv_norms(model):
    return [
        float(np.linalg.norm(ops.convert_to_numpy(layer.kernel)))
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]


def _train_unwrapped(name, net):
    """The bare optimizer's run: final conv kernel norms, and the largest
    |cos(w, Δw)| of its steps on the conv kernels (decay added back)."""
    model, grads_of, batches, start = net
    variables = model.trainable_variables
    for v, value in zip(variables, start):
        v.assign(value)
    optimizer = _inner(name)
    lr = float(optimizer.learning_rate)
    radial = 0.0
    for x, y in batches:
        grads = grads_of(x, y)
        before = _numpy(variables)
        apply(optimizer, grads, variables)
        for v, w, after in zip(variables, before, _numpy(variables)):
            if len(v.shape) == 4:
                dw = after - w * (1 - lr * _decay(optimizer, v))
                cos, _ = _radial_parts(w, dw, _layout(v), projection.LAYER_WISE)
                radial = max(radial, float(cos.max()))
    return _conv_norms(model), radial


def _train_wrapped(name, net, steps):
    """The wrapped run, checking (a) on every step and (c) on the first
    SHADOW_STEPS, against a copy of the variables that the bare inner
    optimizer steps on the same gradients. Returns the final conv kernel
    norms and how many (variable, step) pairs (a) checked."""
    model, grads_of, batches, start = net
    variables = model.trainable_variables
    for v, value in zip(variables, start):
        v.assign(value)
    wrapped = keras_adamp.Projected(_inner(name))
    bare = _inner(name)
    lr = float(bare.learning_rate)
    shadow = [
        keras.Variable(value, name=f"shadow_{i}") for i, value in enumerate(start)
    ]
    diverged = set()  # projected (or undecided) once: (c) no longer applies
    checked = compared = 0
    for step, (x, y) in enumerate(batches[:steps]):
        grads = grads_of(x, y)
        before = _numpy(variables)
        decisions = [
            _decision(w, ops.convert_to_numpy(g), _layout(v))
            if w.ndim > 1
            else projection.NOT_PROJECTED
            for v, w, g in zip(variables, before, grads)
        ]
        apply(wrapped, grads, variables)
        after = _numpy(variables)
        if step < SHADOW_STEPS:
            apply(bare, grads, shadow)
        for i, (v, decision) in enumerate(zip(variables, decisions)):
            if decision != projection.NOT_PROJECTED:
                diverged.add(i)
            if decision in (projection.CHANNEL_WISE, projection.LAYER_WISE):
                # (a): the step, the decay lr * wd * wd_ratio * w added back,
                # has no radial part.
                decayed = before[i] * (1 - lr * _decay(bare, v) * WD_RATIO)
                cos, beyond_rounding = _radial_parts(
                    before[i], after[i] - decayed, _layout(v), decision
                )
                assert beyond_rounding.max() <= TANGENT_TOL, (
                    f"{name} step {step}: {v.path} keeps a radial part, "
                    f"|cos(w, dw)| up to {cos.max():.2e}"
                )
                checked += 1
            elif step < SHADOW_STEPS and i not in diverged:
                # (c): not projected, so exactly the inner optimizer's step.
                np.testing.assert_array_equal(
                    after[i],
                    ops.convert_to_numpy(shadow[i]),
                    err_msg=f"{name} step {step}: {v.path} is not the inner's step",
                )
                compared += 1
    # The conv kernels sit before BatchNorm: the test flags them on every
    # step (so (a) was not vacuous), but for Ftrl, which rebuilds w from its
    # accumulators and so forgets the initial weights' scale on its first
    # step (the kernels shrink 30x; BatchNorm's epsilon then matters).
    assert checked >= (2 if name == "Ftrl" else 2 * steps)
    # (c) covered the 5 variables of rank 1 on every shadow step (and the
    # head on those before its test first came near its threshold).
    assert compared >= 5 * min(steps, SHADOW_STEPS) + 1
    return _conv_norms(model)


@pytest.mark.parametrize(
    "name", sorted(name for name, (_, momentum) in OPTIMIZERS.items() if not momentum)
)
def test_wrapped_step_is_tangent_elsewhere_the_inner_step(name, net):
    _train_wrapped(name, net, SHADOW_STEPS)


@pytest.mark.parametrize(
    "name", sorted(name for name, (_, momentum) in OPTIMIZERS.items() if momentum)
)
def test_wrapped_momentum_optimizer_keeps_the_norm_down(name, net):
    model, _, _, start = net
    kernels = [v for v in model.trainable_variables if len(v.shape) == 4]
    start_norms = [float(np.linalg.norm(w)) for w in start if w.ndim == 4]
    norms_wrapped = _train_wrapped(name, net, STEPS)
    norms_bare, radial_bare = _train_unwrapped(name, net)
    # The bare steps do have the radial part that (a) rules out ...
    assert radial_bare > 10 * TANGENT_TOL, radial_bare
    # ... and (b): it is what inflates the scale-invariant kernels' norm (at
    # least a quarter less growth wrapped; measured: 2x to 10x less). The
    # growth is net of the decay, which alone would scale the norm by
    # (1 - lr * wd * r)^STEPS: bare r = 1, wrapped r = wd_ratio.
    inner = _inner(name)
    lr = float(inner.learning_rate)

    def growth(norms, ratio):
        return np.mean(
            [
                n / (s * (1 - lr * _decay(inner, v) * ratio) ** STEPS) - 1
                for n, s, v in zip(norms, start_norms, kernels)
            ]
        )

    growth_wrapped, growth_bare = (
        growth(norms_wrapped, WD_RATIO),
        growth(norms_bare, 1.0),
    )
    assert 0 < growth_bare and growth_wrapped < 0.75 * growth_bare, (
        growth_wrapped,
        growth_bare,
    )
