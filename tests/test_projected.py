"""`keras_adamp.Projected`: AdamP's projection on any Keras optimizer's update.

Equivalence: Projected(AdamW) follows AdamP and Projected(SGD, Nesterov)
follows SGDP with the same settings, where Keras's conventions and the
reference's agree (see `equivalent`); the wrapper in every compiled mode; the
errors that say what to do instead; mixed precision, sparse gradients,
MirroredStrategy, stateless_apply; saving; diagnostics; the short names."""

import contextlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from _data import apply
from _data import conv_bn_model
from _data import digits
from _data import ignore_guessed_channels
from _processes import only_in_pass
from _processes import worker_env
from keras import ops

import keras_adamp
from keras_adamp import SGDP
from keras_adamp import AdamP
from keras_adamp import Projected

BACKEND = keras.backend.backend()

# The free variables here have no layer: their output channels are guessed
# from the shape (the rule every test of this file means), with a warning.
pytestmark = ignore_guessed_channels

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
    "jax": ["jit"],
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
    for path, g, w in zip(VARIABLES, got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=path)
    if mode != MODES[0]:
        return
    unprojected = run(plain(), mode)
    for path, g, w, u in zip(VARIABLES, got, want, unprojected):
        kind = VARIABLES[path][1]
        if kind is not None:
            # The projection fired: the plain optimizer's weight is elsewhere.
            assert np.max(np.abs(u - w)) > 1e-3, path
        else:
            # Never projected, or not this time: exactly the inner's step.
            np.testing.assert_array_equal(g, u, err_msg=path)


# -- what cannot be wrapped ------------------------------------------------


@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
            "outside",
        ),
        (
            lambda: keras.optimizers.MultiOptimizer(
                keras.optimizers.OptimizerMap(keras.optimizers.SGD())
            ),
            "each in its own Projected",
        ),
        (
            lambda: keras.optimizers.OptimizerMap(keras.optimizers.SGD()),
            "each in its own Projected",
        ),
        (lambda: AdamP(), "Projected(keras.optimizers.AdamW"),
        (lambda: SGDP(learning_rate=0.1), "Projected(keras.optimizers.SGD"),
        (lambda: keras_adamp.AdamS(), "Use keras_adamp.AdamS alone"),
        (lambda: Projected(keras.optimizers.SGD()), "already wrapped"),
        (lambda: "adamw", "keras.optimizers.get('lion')"),
    ],
)
def test_what_cannot_be_wrapped_is_rejected_saying_what_to_do(make, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        Projected(make())


def test_an_optimizer_wrapped_once_cannot_be_wrapped_again():
    inner = keras.optimizers.SGD()
    Projected(inner)
    with pytest.raises(ValueError, match="already wrapped"):
        Projected(inner)


def test_base_arguments_belong_to_the_inner_optimizer():
    with pytest.raises(ValueError, match="on the inner optimizer"):
        Projected(keras.optimizers.SGD(), clipnorm=1.0)
    with pytest.raises(ValueError, match="wd_ratio"):
        Projected(keras.optimizers.SGD(), wd_ratio=2.0)


# -- the short names ---------------------------------------------------------

SHORT_NAMES = {
    "adamp": AdamP,
    "sgdp": SGDP,
    "adams": keras_adamp.AdamS,
    "adamsrt": keras_adamp.AdamSRT,
    "sgdmrt": keras_adamp.SGDMRT,
}


@pytest.mark.parametrize("name", list(SHORT_NAMES))
# With their defaults the spherical optimizers designate no kernel (warned).
@pytest.mark.filterwarnings("ignore:.*no variable is designated spherical")
def test_short_lowercase_names_resolve_through_keras(name):
    optimizer = keras.optimizers.get(name)
    assert type(optimizer) is SHORT_NAMES[name]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is SHORT_NAMES[name]
    model.fit(np.ones((4, 3)), np.zeros((4, 2)), verbose=0)
    assert int(model.optimizer.iterations) == 1


def test_short_names_shadow_no_keras_name():
    import keras.src.optimizers as keras_optimizers

    for name in SHORT_NAMES:
        assert name not in keras_optimizers.ALL_OBJECTS_DICT
        for module in (keras.layers, keras.losses, keras.metrics, keras.activations):
            assert name not in {n.lower() for n in dir(module)}, (name, module)
    # Keras's own names still give Keras's optimizers.
    assert type(keras.optimizers.get("adam")).__name__ == "Adam"
    assert type(keras.optimizers.get("sgd")).__name__ == "SGD"


# -- saving --------------------------------------------------------------------


# The first Conv2D's kernel whatever its unique name (conv2d, conv2d_3, ...):
# matching no variable would leave the override untested, with a warning.
CONV_KERNEL = r"conv2d(_\d+)?/kernel"


def wrapped_model():
    model = conv_bn_model()
    model.compile(
        optimizer=Projected(
            keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.01),
            delta=0.2,
            wd_ratio=0.5,
            channel_axes={CONV_KERNEL: [3]},
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_config_round_trips_without_custom_objects():
    optimizer = Projected(
        keras.optimizers.Lion(learning_rate=1e-4, weight_decay=0.1),
        delta=0.2,
        wd_ratio=0.3,
        eps=1e-6,
        channel_axes={"dense": 1},
    )
    config = optimizer.get_config()
    assert config["inner_optimizer"]["class_name"] == "Lion"
    for restored in (
        Projected.from_config(config),
        keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)),
        keras.optimizers.get(keras.optimizers.serialize(optimizer)),
    ):
        assert isinstance(restored, Projected)
        assert isinstance(restored.inner_optimizer, keras.optimizers.Lion)
        assert restored.get_config() | {"name": None} == config | {"name": None}


def trained_and_saved(n, tmp_path):
    """`wrapped_model()` after one epoch on `n` digits (batches of 16),
    saved to a .keras file: the model, the file's path, the data."""
    x, y = digits(n)
    model = wrapped_model()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    return model, path, x, y


def test_a_compiled_model_round_trips_through_keras_file_and_resumes_exactly(
    tmp_path,
):
    model, path, x, y = trained_and_saved(64, tmp_path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, Projected)
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.AdamW)
    assert loaded.optimizer.wd_ratio == 0.5
    assert loaded.optimizer.channel_axes == {CONV_KERNEL: (3,)}
    assert int(loaded.optimizer.iterations) == 4
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), err_msg=a.path
        )
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert len(loaded.get_weights()) == len(model.get_weights())
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


# Saves in the TensorFlow pass, loads on JAX and torch.
@only_in_pass("tensorflow")
def test_a_saved_wrapped_model_loads_on_the_other_backends(tmp_path):
    model, path, _, _ = trained_and_saved(32, tmp_path)
    script = (
        "import sys, keras, keras_adamp, numpy as np\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert type(m.optimizer).__name__ == 'Projected', m.optimizer\n"
        "assert int(m.optimizer.iterations) == 2\n"
        "np.savez(sys.argv[2], *m.get_weights(), *[\n"
        "    keras.ops.convert_to_numpy(v) for v in m.optimizer.variables])\n"
    )
    want = model.get_weights() + [
        ops.convert_to_numpy(v) for v in model.optimizer.variables
    ]
    for other in ("jax", "torch"):
        out = str(tmp_path / f"{other}.npz")
        subprocess.run(
            [sys.executable, "-c", script, path, out],
            env=worker_env(other),
            check=True,
            timeout=300,
        )
        with np.load(out) as saved:
            assert len(saved.files) == len(want)
            for i, w in enumerate(want):
                np.testing.assert_array_equal(saved[f"arr_{i}"], w, err_msg=other)


# -- diagnostics and callbacks -----------------------------------------------


def test_diagnostics_and_the_norm_monitor_use_the_wrappers_test():
    x, y = digits(32)
    model = wrapped_model()
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    kernel = model.layers[0].kernel
    assert optimizer.channel_layout(kernel).channel_axes == (3,)
    assert keras_adamp.layouts.channel_layout(optimizer, kernel) is (
        optimizer.channel_layout(kernel)
    )
    rows = keras_adamp.diagnostics.scale_invariance_report(model, x, y)
    by_path = {row.path: row for row in rows}
    assert by_path[kernel.path].scale_invariant
    assert not by_path[model.layers[-1].kernel.path].scale_invariant
    # The wrapper's delta is the one used: a huge delta passes the head too.
    optimizer.delta = 1e6
    rows = keras_adamp.diagnostics.scale_invariance_report(model, x, y)
    assert {row.path: row for row in rows}[model.layers[-1].kernel.path].scale_invariant
    optimizer.delta = 0.2
    monitor = keras_adamp.callbacks.ScaleInvariantNormMonitor(data=(x, y))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert kernel.path in monitor.tracked_paths
    assert model.layers[-1].kernel.path not in monitor.tracked_paths


# -- every path of a step ----------------------------------------------------


@pytest.mark.skipif(BACKEND != "torch", reason="the torch executor's fallback")
def test_generic_path_on_torch_equals_the_torch_executor(monkeypatch):
    from keras_adamp import _torch

    wrapped, _, _ = PAIRS["adamw"]
    fast = run(wrapped(), "eager")
    monkeypatch.setattr(_torch, "ENABLED", False)
    generic = run(wrapped(), "eager")
    for path, a, b in zip(VARIABLES, fast, generic):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)


# name -> (the wrapped optimizer, steps, whether stateless_apply is passed
# copies of the values (else the variables' own values: on torch their
# parameters, which an in-place step would write into), jax.jit on JAX).
STATELESS_CASES = {
    "sgd_nesterov_copies_jit": (PAIRS["sgd_nesterov"][0], 3, True, True),
    # Lamb runs Keras's generic step on every backend (no torch executor of
    # Keras's own to write into the mapped tensors).
    "lamb_own_values": (
        lambda: Projected(keras.optimizers.Lamb(learning_rate=0.01)),
        2,
        False,
        False,
    ),
}


@pytest.mark.skipif(BACKEND == "tensorflow", reason="TF has no stateless_apply")
@pytest.mark.parametrize("case", list(STATELESS_CASES))
def test_stateless_apply_equals_apply_and_changes_no_variable(case):
    make, steps, copies, jit = STATELESS_CASES[case]
    stateful = run(make(), "eager", steps=steps)
    optimizer = make()
    variables = make_variables()
    optimizer.build(variables)
    start = [ops.convert_to_numpy(v) for v in variables]
    train = [v.value for v in variables]
    opt = [v.value for v in optimizer.variables]
    if copies:
        train, opt = [ops.copy(x) for x in train], [ops.copy(x) for x in opt]
    stateless_apply = optimizer.stateless_apply
    if jit and BACKEND == "jax":
        import jax

        stateless_apply = jax.jit(stateless_apply)
    for noise in noise_sequence(steps):
        noise = [ops.convert_to_tensor(r) for r in noise]
        grads = gradients([ops.stop_gradient(x) for x in train], noise)
        train, opt = stateless_apply(opt, grads, train)
    for path, a, b in zip(VARIABLES, stateful, train):
        np.testing.assert_allclose(
            a, ops.convert_to_numpy(b), rtol=1e-5, atol=1e-7, err_msg=path
        )
    for v, w in zip(variables, start):
        np.testing.assert_array_equal(ops.convert_to_numpy(v), w)
    assert int(optimizer.iterations) == 0


def test_gradient_accumulation_and_clipping_stay_the_inner_optimizers():
    # The projection acts on the accumulated step only; clipping happens
    # before it (the cosine sees the clipped gradient, as the inner does).
    def make(**kwargs):
        return Projected(
            keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.05, **kwargs)
        )

    variables = make_variables()
    optimizer = make(gradient_accumulation_steps=2, clipnorm=0.5)
    optimizer.build(variables)
    trajectory, seen = [], []
    for noise in noise_sequence(4):
        values = [ops.stop_gradient(v.value) for v in variables]
        noise = [ops.convert_to_tensor(r) for r in noise]
        grads = gradients(values, noise)
        seen.append([ops.convert_to_numpy(g) for g in grads])
        apply(optimizer, grads, variables)
        trajectory.append([ops.convert_to_numpy(v) for v in variables])
    # Accumulating steps leave the weights alone.
    for a, b in zip(make_variables(), trajectory[0]):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), b)
    np.testing.assert_array_equal(trajectory[1][0] == trajectory[2][0], True)
    assert int(optimizer.iterations) == 2
    assert np.max(np.abs(trajectory[3][0] - trajectory[1][0])) > 0
    # The same as the wrapper without either, given each pair of gradients
    # averaged and then clipped to norm 0.5 by hand (Keras clips the
    # accumulated gradient, per variable); the clipping acted.
    plain = make()
    by_hand = make_variables()
    clipped = 0
    for first, second in zip(seen[0::2], seen[1::2]):
        grads = []
        for a, b in zip(first, second):
            g = (a + b) / 2
            norm = np.sqrt(np.sum(g.astype("float64") ** 2))
            clipped += norm > 0.5
            grads.append((g * min(1.0, 0.5 / norm)).astype("float32"))
        apply(plain, grads, by_hand)
    assert clipped > 0
    for a, b, path in zip(by_hand, trajectory[3], VARIABLES):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), b, rtol=1e-5, atol=1e-6, err_msg=path
        )


# -- mixed precision, sparse gradients, tf.distribute ------------------------


def test_mixed_float16_compile_wraps_the_wrapper_in_a_loss_scale_optimizer(policy):
    policy("mixed_float16")
    x, y = digits(256)

    def sgd():
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, weight_decay=1e-3)

    def fit(optimizer):
        """The compiled model after 3 epochs, its losses, and the growth of
        its conv kernels' norms."""
        model = conv_bn_model(logits_dtype="float32")
        kernels = [
            layer.kernel
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]
        start = [np.linalg.norm(ops.convert_to_numpy(k)) for k in kernels]
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
        growth = [
            np.linalg.norm(ops.convert_to_numpy(k)) - s for k, s in zip(kernels, start)
        ]
        return model, history["loss"], np.array(growth)

    model, losses, growth = fit(Projected(sgd()))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, Projected)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    rows = keras_adamp.diagnostics.scale_invariance_report(model, x[:32], y[:32])
    assert rows[0].scale_invariant
    # The projection ran: the BatchNorm-followed kernels' norms barely grow,
    # where the bare SGD's grow (measured: about 10x more on every backend).
    _, _, growth_bare = fit(sgd())
    assert np.all(growth < 0.5 * growth_bare), (growth, growth_bare)


def test_loss_scale_optimizer_outside_skips_a_non_finite_step():
    variables = make_variables()
    optimizer = keras.optimizers.LossScaleOptimizer(
        Projected(keras.optimizers.AdamW(learning_rate=0.01)), initial_scale=4.0
    )
    noise = [ops.convert_to_tensor(r) for r in noise_sequence(1)[0]]
    grads = gradients([ops.stop_gradient(v.value) for v in variables], noise)
    start = [ops.convert_to_numpy(v) for v in variables]
    bad = list(grads)
    bad[0] = bad[0] * np.inf
    apply(optimizer, bad, variables)
    for v, w in zip(variables, start):
        np.testing.assert_array_equal(ops.convert_to_numpy(v), w)
    # A finite step: the unscaled gradient reaches the wrapped AdamW.
    # (the scale was halved to 2)
    apply(optimizer, [g * 2.0 for g in grads], variables)
    reference = Projected(keras.optimizers.AdamW(learning_rate=0.01))
    mirror = make_variables()
    apply(reference, grads, mirror)
    for v, w in zip(variables, mirror):
        np.testing.assert_allclose(
            ops.convert_to_numpy(v), ops.convert_to_numpy(w), rtol=1e-5, atol=1e-7
        )


@pytest.mark.tensorflow_only
def test_sparse_embedding_gradients_train_as_adamp():
    from test_sparse import data
    from test_sparse import embedding_model

    x, y = data()

    def fit(optimizer):
        model = embedding_model()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    # Plain SGD steps sparse and dense gradients alike (Keras's Adam does
    # not: its moments see an IndexedSlices' rows only), so SGDP without
    # momentum is the reference.
    got = fit(Projected(keras.optimizers.SGD(learning_rate=0.5, weight_decay=1e-3)))
    want = fit(SGDP(learning_rate=0.5, weight_decay=1e-3))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.tensorflow_only
def test_mirrored_strategy_on_one_device_equals_no_strategy():
    import tensorflow as tf

    x, y = digits(128)

    def fit(scope):
        with scope:
            model = conv_bn_model()
            model.compile(
                optimizer=Projected(
                    keras.optimizers.SGD(
                        learning_rate=0.05, momentum=0.9, weight_decay=1e-3
                    )
                ),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    got = fit(strategy.scope())
    want = fit(contextlib.nullcontext())
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="the torch executor's sums")
@pytest.mark.parametrize(
    "shape, axes, dtype",
    [
        ((3, 3, 256, 80), (3,), "float32"),  # a kernel's (rows, C), in blocks
        ((700, 200), (0,), "float32"),  # an Embedding's rows: (C, dim)
        ((600, 256), (1,), "float16"),
        ((600, 256), (), "float32"),  # the whole tensor as one group
    ],
)
def test_torch_channel_sums_in_blocks_equal_the_plain_sums(shape, axes, dtype):
    import torch

    from keras_adamp import _torch
    from keras_adamp import _torch_projected
    from keras_adamp import layouts

    layout = layouts.ChannelLayout.create(shape, axes)
    assert layout.numel > _torch._BLOCK  # the blocked path
    gen = torch.Generator().manual_seed(0)
    g, w, d = (torch.randn(layout.view, generator=gen) for _ in range(3))
    g, w, w_new = (x.to(getattr(torch, dtype)) for x in (g, w, w + 0.01 * d))
    got = _torch._channel_sums(layout, (g, w, w_new), _torch_projected._products_all, 4)
    g, w, w_new = (x.double() for x in (g, w, w_new))
    want = torch.stack(
        [
            torch.sum(a * b, dim=layout.reduce_axes)
            for a, b in ((g, w), (g, g), (w, w), (w, w_new - w))
        ]
    ).reshape(4, layout.num_channels)
    scale = torch.sqrt(
        torch.sum(w * w, dim=layout.reduce_axes)
        * torch.sum(g * g, dim=layout.reduce_axes)
    )
    np.testing.assert_allclose(
        (got.double() - want).numpy() / scale.numpy(), 0.0, atol=1e-5
    )


def test_the_inner_optimizers_weight_decay_exclusions_are_honoured():
    def excluded(optimizer):
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        inner.exclude_from_weight_decay(var_names=["dense_kernel", "gamma"])
        return optimizer

    wrapped, reference, _ = PAIRS["adamw"]
    got = run(excluded(wrapped()), MODES[0])
    want = run(excluded(reference()), MODES[0])
    decayed = run(reference(), MODES[0])
    for path, g, w, d in zip(VARIABLES, got, want, decayed):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6, err_msg=path)
    # The exclusion mattered: the excluded kernel is elsewhere with decay.
    assert np.max(np.abs(got[1] - decayed[1])) > 1e-4


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's buffer assignment on JAX")
@pytest.mark.parametrize("inner", ["AdamW", "SGD", "Lion"])
def test_the_compiled_steps_temporaries_are_the_inners_and_a_few_kernels(inner):
    # The kernels are stepped one at a time: on top of what the inner's own
    # step holds, one kernel's update and the three products its test sums
    # reduce (XLA on CPU writes a product out before reducing it). A step
    # that decided after updating every kernel held them all (+1.0
    # parameters' size here, 8 kernels).
    import jax

    shapes = [(256, 256)] * 8
    kernel_bytes = 4 * 256 * 256

    def temporaries(optimizer):
        rng = np.random.default_rng(0)
        variables = [
            keras.Variable(rng.normal(size=s).astype("float32"), name=f"k{i}_kernel")
            for i, s in enumerate(shapes)
        ]
        optimizer.build(variables)
        grads = [
            ops.convert_to_tensor(rng.normal(size=s).astype("float32")) for s in shapes
        ]
        step = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
        compiled = step.lower(
            [ops.copy(v.value) for v in optimizer.variables],
            grads,
            [ops.copy(v.value) for v in variables],
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    make = getattr(keras.optimizers, inner)
    bare = temporaries(make(learning_rate=1e-3))
    wrapped = temporaries(Projected(make(learning_rate=1e-3)))
    assert wrapped <= bare + 4.2 * kernel_bytes, (wrapped, bare)


# One process, TensorFlow: the step of `optimizer` on 8 kernels of 256x256
# compiled by XLA, dumped to the directory given, as the tf.function "step_"
# followed by the name given.
_TF_XLA_STEP = """
import sys
import keras
import numpy as np
import tensorflow as tf
from keras_adamp import Projected

inner, name = sys.argv[1], sys.argv[2]
optimizer = getattr(keras.optimizers, inner)(learning_rate=1e-3)
if name == "wrapped":
    optimizer = Projected(optimizer)
rng = np.random.default_rng(0)
shapes = [(256, 256)] * 8
variables = [
    keras.Variable(rng.normal(size=s).astype("float32"), name=f"k{i}_kernel")
    for i, s in enumerate(shapes)
]
grads = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]
optimizer.build(variables)

def step(grads):
    optimizer.apply(grads, variables)
    return optimizer.iterations

step.__name__ = "step_" + name
tf.function(step, jit_compile=True)(grads).numpy()
"""


def _tf_xla_temporaries(inner, name, dump):
    env = worker_env("tensorflow")
    env["XLA_FLAGS"] = f"--xla_dump_to={dump}"
    subprocess.run(
        [sys.executable, "-c", _TF_XLA_STEP, inner, name],
        env=env,
        check=True,
        timeout=240,
        capture_output=True,
    )
    [report] = [
        p
        for p in dump.iterdir()
        if p.name.endswith("buffer-assignment.txt") and f"step_{name}" in p.name
    ]
    found = re.search(r"size (\d+), preallocated-temp", report.read_text())
    return int(found.group(1)) if found else 0


@only_in_pass("tensorflow")
@pytest.mark.parametrize("inner", ["SGD", "AdamW"])
def test_tensorflow_xla_holds_one_updated_kernel_at_a_time(inner, tmp_path):
    # XLA's CPU scheduler runs whatever is ready, breadth first: a step that
    # decided after updating every kernel held all the updated kernels (1.25
    # parameters' sizes with the sums' row blocks). The ordered step holds
    # one kernel's update and its blocks.
    parameter_bytes = 8 * 4 * 256 * 256
    bare = _tf_xla_temporaries(inner, "bare", tmp_path / "bare")
    wrapped = _tf_xla_temporaries(inner, "wrapped", tmp_path / "wrapped")
    assert wrapped - bare <= 0.3 * parameter_bytes, (wrapped, bare)
    assert wrapped > 0  # the report was read


@pytest.mark.skipif(
    BACKEND == "torch", reason="torch's Keras classes step as a whole (_foreach)"
)
def test_only_keras_loops_over_variables_are_stepped_one_variable_at_a_time():
    # Nadam advances a product shared by all variables before its loop; a
    # subclass may keep state across variables: both step all at once.
    from keras_adamp.projected import _steps_per_variable

    class Counting(keras.optimizers.SGD):
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)

    for name in ["SGD", "AdamW", "Lion", "Lamb", "Adafactor", "Muon"]:
        assert _steps_per_variable(type(getattr(keras.optimizers, name)())), name
    assert not _steps_per_variable(type(keras.optimizers.Nadam()))
    assert not _steps_per_variable(Counting)
