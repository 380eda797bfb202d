"""Mixed precision: training under the mixed_float16 / mixed_bfloat16 policies
(fit wraps the optimizer in a LossScaleOptimizer for float16), skipped steps
on overflow, and 16-bit variables, whose norms and cosines are computed in
float32."""

import keras
import numpy as np
import pytest
from _data import apply
from _data import conv_bn_model
from _data import digits

from keras_adamp import SGDP
from keras_adamp import AdamP
from keras_adamp import projection

OPTIMIZERS = {
    "adamp": lambda **kw: AdamP(learning_rate=0.01, weight_decay=0.01, **kw),
    "sgdp": lambda **kw: SGDP(
        learning_rate=0.05, momentum=0.9, weight_decay=1e-4, **kw
    ),
}


@pytest.mark.parametrize("policy_name", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_mixed_precision_fit_trains_a_batchnorm_cnn(
    policy, policy_name, optimizer_name
):
    policy(policy_name)
    x, y = digits(512)
    model = conv_bn_model(logits_dtype="float32")
    model.compile(
        optimizer=OPTIMIZERS[optimizer_name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if policy_name == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(model.optimizer.inner_optimizer, (AdamP, SGDP)), (
            model.optimizer.inner_optimizer
        )
    assert model.layers[0].compute_dtype == policy_name.split("_")[1]
    assert model.layers[0].kernel.dtype == "float32"  # float32 master weights
    losses = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses
    for w in model.get_weights():
        assert np.all(np.isfinite(w))


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_loss_scaler_skips_an_inf_step_and_leaves_state_untouched(optimizer_name):
    rng = np.random.default_rng(0)
    kernel = keras.Variable(rng.standard_normal((5, 4)).astype("float32"))
    bias = keras.Variable(np.zeros(4, "float32"))
    variables = [kernel, bias]
    inner = OPTIMIZERS[optimizer_name]()
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    optimizer.build(variables)

    def grads(bad=None):
        g = [
            rng.standard_normal((5, 4)).astype("float32") * 1000,
            rng.standard_normal(4).astype("float32") * 1000,
        ]
        if bad is not None:
            g[0][2, 1] = bad
        return g

    apply(optimizer, grads(), variables)  # a normal step: nonzero state
    snapshot = lambda: [
        keras.ops.convert_to_numpy(v) for v in [*variables, *inner.variables]
    ]
    before = snapshot()
    scale = float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 1

    for bad in (np.inf, -np.inf, np.nan):
        apply(optimizer, grads(bad), variables)
        scale /= 2  # the scaler halves the loss scale on overflow ...
        assert float(keras.ops.convert_to_numpy(optimizer.dynamic_scale)) == scale
        # ... and nothing else moves: weights, moments, step count
        for a, b in zip(snapshot(), before):
            np.testing.assert_array_equal(a, b)

    apply(optimizer, grads(), variables)  # finite again: a real step
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 2
    assert not np.array_equal(keras.ops.convert_to_numpy(kernel), before[0])


def decision(w, g, dtype, layout):
    return int(
        projection.scale_invariance(
            keras.ops.convert_to_tensor(w, dtype),
            keras.ops.convert_to_tensor(g, dtype),
            layout,
            0.1,
            1e-8,
        )
    )


def near_threshold(rows, lean, seed):
    """(w, g) of shape (rows, 6) with |cos(g_c, w_c)| = lean * delta / sqrt(rows)
    in every channel: the sums decide within a few percent."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, 6))
    r = rng.standard_normal((rows, 6))
    w_hat = w / np.linalg.norm(w, axis=0)
    o = r - w_hat * (r * w_hat).sum(0)
    o /= np.linalg.norm(o, axis=0)
    cos = lean * 0.1 / np.sqrt(rows)
    return w, o * np.sqrt(1 - cos**2) + w_hat * cos


def cases(rng):
    """(name, w, g): each decided in float32 on the 16-bit-rounded values."""
    w = rng.standard_normal((64, 6))
    r = rng.standard_normal((64, 6))
    orth = r - w * (r * w).sum(0) / (w * w).sum(0)
    layer_orth = r - w * (r * w).sum() / (w * w).sum()
    yield "channel_orthogonal", w, orth
    yield "layer_orthogonal", w, layer_orth
    yield "aligned", w, r + w
    # ||w_c|| ~ 400 > 256: <w, w> overflows float16 (max 65504), which in
    # float16 arithmetic would make every cosine 0 and project an aligned
    # gradient
    yield "aligned_large_weights", w * 50, r + w
    yield "orthogonal_large_weights", w * 50, orth
    # gradients of 1e-4: <g, g> ~ 1e-8 underflows float16
    yield "aligned_small_gradients", w, (r + w) * 1e-4
    yield "orthogonal_small_gradients", w, orth * 1e-4
    # cosines 5% below / above the threshold: bfloat16 sums (8-bit mantissa)
    # get the first one wrong (on TensorFlow: checked by running this test
    # with projection._views patched not to cast to float32)
    yield ("just_below_threshold", *near_threshold(256, 0.95, seed=4))
    yield ("just_above_threshold", *near_threshold(256, 1.05, seed=4))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_variables_decide_the_projection_as_float32_does(dtype):
    rng = np.random.default_rng(0)
    seen = set()
    for name, w, g in cases(rng):
        layout = projection.ChannelLayout.create(w.shape, -1)
        w16 = keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.convert_to_tensor(w, "float32"), dtype)
        ).astype("float32")
        g16 = keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.convert_to_tensor(g, "float32"), dtype)
        ).astype("float32")
        expected = decision(w16, g16, "float32", layout)
        assert decision(w16, g16, dtype, layout) == expected, name
        seen.add(expected)
    # the cases cover all three outcomes
    assert seen == {
        projection.CHANNEL_WISE,
        projection.LAYER_WISE,
        projection.NOT_PROJECTED,
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_16_bit_variable_steps_like_float32(dtype, optimizer_name):
    """A float16/bfloat16 variable takes the float32 step, to its precision,
    including for weights whose <w, w> overflows float16.

    AdamP on float16 variables needs an epsilon float16 can hold: the default
    1e-8 rounds to 0 there, and where the second moment underflows (|g| below
    ~1e-3) Adam's denominator is 0, as in the reference run in half precision
    (docs/distributed.md, "Mixed precision")."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 6)) * 50).astype("float32")
    overrides = (
        {"epsilon": 1e-4} if optimizer_name == "adamp" and dtype == "float16" else {}
    )
    results = {}
    for run_dtype in (dtype, "float32"):
        variable = keras.Variable(w, dtype=run_dtype)
        optimizer = OPTIMIZERS[optimizer_name](**overrides)
        optimizer.build([variable])
        for _ in range(5):
            w_now = keras.ops.convert_to_numpy(variable).astype("float64")
            r = rng.standard_normal(w.shape)
            g = r - w_now * (r * w_now).sum(0) / (w_now * w_now).sum(0)
            apply(optimizer, [keras.ops.cast(g, run_dtype)], [variable])
        results[run_dtype] = keras.ops.convert_to_numpy(
            keras.ops.cast(variable.value, "float32")
        )
        rng = np.random.default_rng(1)
        rng.standard_normal((64, 6))
    assert np.all(np.isfinite(results[dtype]))
    tolerance = 1e-2 if dtype == "float16" else 5e-2
    np.testing.assert_allclose(
        results[dtype], results["float32"], rtol=0, atol=tolerance * 50
    )
