"""keras_adamp.diagnostics: the scale-invariance report (any backend)."""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_adamp
from keras_adamp import diagnostics


def _model(optimizer=None):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(5, use_bias=False, name="hidden")(x)
    x = layers.LayerNormalization(name="ln")(x)
    outputs = layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=optimizer or keras_adamp.AdamP(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _batch():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(16, 6, 6, 2)).astype("float32"),
        rng.integers(0, 3, 16).astype("int32"),
    )


def _by_path(rows):
    return {row.path.split("/")[0] + "/" + row.path.split("/")[-1]: row for row in rows}


def test_report_flags_normalised_kernels_only():
    model = _model()
    x, y = _batch()
    rows = _by_path(diagnostics.scale_invariance_report(model, x, y))
    assert rows["conv/kernel"].decision == diagnostics.CHANNEL_WISE
    # LayerNorm normalises the whole feature vector: only the whole Dense kernel
    # is scale-invariant, not each output column.
    assert rows["hidden/kernel"].decision == diagnostics.LAYER_WISE
    assert rows["head/kernel"].decision == diagnostics.NOT_PROJECTED
    assert rows["head/bias"].decision == diagnostics.RANK_LE_1
    assert rows["bn/gamma"].decision == diagnostics.RANK_LE_1
    conv = rows["conv/kernel"]
    assert conv.channel_axes == (3,) and conv.num_channels == 4
    assert (
        conv.max_channel_cos
        < conv.channel_threshold
        == pytest.approx(0.1 / np.sqrt(18))
    )
    head = rows["head/kernel"]
    assert head.max_channel_cos >= head.channel_threshold
    assert head.layer_cos >= head.layer_threshold
    assert conv.norm == pytest.approx(
        float(np.linalg.norm(ops.convert_to_numpy(model.get_layer("conv").kernel)))
    )


def test_report_leaves_batchnorm_statistics_unchanged():
    model = _model()
    bn = model.get_layer("bn")
    before = [ops.convert_to_numpy(v) for v in bn.non_trainable_variables]
    diagnostics.scale_invariance_report(model, *_batch())
    after = [ops.convert_to_numpy(v) for v in bn.non_trainable_variables]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_report_uses_the_optimizers_override_and_delta():
    optimizer = keras_adamp.SGDP(0.1, channel_axes={"conv/kernel": []}, delta=0.0)
    model = _model(optimizer)
    optimizer.build(model.trainable_variables)  # channel_layout() path
    rows = _by_path(diagnostics.scale_invariance_report(model, *_batch()))
    assert rows["conv/kernel"].channel_axes == ()
    assert rows["conv/kernel"].num_channels == 1
    # delta = 0: nothing passes |cos| < 0.
    assert rows["conv/kernel"].decision == diagnostics.NOT_PROJECTED
    assert rows["hidden/kernel"].decision == diagnostics.NOT_PROJECTED


def test_report_with_given_gradients():
    model = _model()
    variables = model.trainable_variables
    grads = []
    for v in variables:
        value = ops.convert_to_numpy(v.value)
        if v.path.startswith("conv"):
            grads.append(value)  # parallel to w: |cos| = 1
        elif v.path.startswith("head"):
            grads.append(np.zeros_like(value))  # zero gradient counts as invariant
        else:
            grads.append(None)
    rows = _by_path(
        diagnostics.scale_invariance_report(model, None, None, gradients=grads)
    )
    assert rows["conv/kernel"].decision == diagnostics.NOT_PROJECTED
    assert rows["conv/kernel"].max_channel_cos == pytest.approx(1.0, rel=1e-5)
    assert rows["head/kernel"].decision == diagnostics.CHANNEL_WISE
    assert rows["hidden/kernel"].decision == diagnostics.NO_GRADIENT
    with pytest.raises(ValueError, match="one gradient per trainable"):
        diagnostics.scale_invariance_report(model, None, None, gradients=grads[:2])


def test_format_and_summary():
    model = _model()
    rows = diagnostics.scale_invariance_report(model, *_batch())
    summary = diagnostics.summarize(rows)
    assert summary[diagnostics.CHANNEL_WISE] == 1
    assert summary[diagnostics.LAYER_WISE] == 1
    assert summary[diagnostics.NOT_PROJECTED] == 1
    assert summary["projected_params"] == 3 * 3 * 2 * 4 + 4 * 5
    text = diagnostics.format_report(rows)
    assert "conv/kernel" in text and "channel-wise" in text
    assert "1 channel-wise, 1 layer-wise, 1 not projected" in text


def test_needs_a_loss():
    model = _model()
    uncompiled = keras.Model(model.input, model.output)
    with pytest.raises(ValueError, match="loss"):
        diagnostics.scale_invariance_report(uncompiled, *_batch())
    rows = diagnostics.scale_invariance_report(
        uncompiled,
        *_batch(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert _by_path(rows)["conv/kernel"].scale_invariant


def test_gradients_are_the_losses():
    # compute_gradients against a closed form: loss = mean((x @ w)^2) / 2.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2, use_bias=False)])
    x = np.arange(12, dtype="float32").reshape(4, 3) / 10
    w = ops.convert_to_numpy(model.layers[0].kernel)
    (g,) = diagnostics.compute_gradients(
        model,
        x,
        np.zeros((4, 2), "float32"),
        loss=lambda y_true, y_pred: ops.sum(ops.square(y_pred), axis=-1) / 2,
    )
    np.testing.assert_allclose(ops.convert_to_numpy(g), x.T @ (x @ w) / 4, rtol=1e-5)


def test_report_decisions_are_the_optimizers_test():
    # The report's decision (compiled on JAX) equals projection.scale_invariance,
    # on gradients forcing each branch.
    from keras_adamp import projection

    model = _model()
    rng = np.random.default_rng(2)
    grads = []
    for v in model.trainable_variables:
        w = ops.convert_to_numpy(v.value)
        r = rng.standard_normal(w.shape).astype("float32")
        if v.path.startswith("conv"):  # orthogonal per output channel
            r = r - w * (r * w).sum((0, 1, 2)) / (w * w).sum((0, 1, 2))
        elif v.path.startswith("hidden"):  # orthogonal to the whole tensor
            r = r - w * (r * w).sum() / (w * w).sum()
        grads.append(r)
    rows = diagnostics.scale_invariance_report(model, None, None, gradients=grads)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    decided = []
    for v, g, row in zip(model.trainable_variables, grads, rows):
        layout = optimizer.channel_layout(v)
        if layout is None:
            continue
        code = int(
            ops.convert_to_numpy(
                projection.scale_invariance(
                    v.value, g, layout, optimizer.delta, optimizer.epsilon
                )
            )
        )
        decided.append(row.decision)
        assert diagnostics._DECISIONS[code] == row.decision, row.path
    assert sorted(decided) == sorted(
        [diagnostics.CHANNEL_WISE, diagnostics.LAYER_WISE, diagnostics.NOT_PROJECTED]
    )


def test_unet_transposed_kernels_are_channel_wise_with_channel_axes_for():
    from test_layouts import unet

    model = unet()
    model.compile(
        loss="mse",
        optimizer=keras_adamp.AdamP(channel_axes=keras_adamp.channel_axes_for(model)),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    grads = diagnostics.compute_gradients(model, x, y)
    rows = {
        r.path: r
        for r in diagnostics.scale_invariance_report(model, None, None, gradients=grads)
    }
    for name in ("down1", "down2", "up", "fuse"):  # each followed by BatchNorm
        assert rows[f"{name}/kernel"].decision == diagnostics.CHANNEL_WISE, name
    assert rows["up/kernel"].channel_axes == (2,)
    # Grouped by input channel (the static rules), the test fails per channel.
    static = diagnostics.scale_invariance_report(
        model,
        None,
        None,
        gradients=grads,
        optimizer=keras_adamp.AdamP(channel_axes={"up/kernel": [3]}),
    )
    up = next(r for r in static if r.path == "up/kernel")
    assert up.decision != diagnostics.CHANNEL_WISE
    assert up.max_channel_cos > up.channel_threshold


@pytest.fixture
def mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def residual_model(seed=3):
    """A kernel on a residual branch scaled by 1e-7: its float16 gradient
    underflows to 0 unless the loss is scaled. And a LayerNorm'ed kernel
    (layer-wise scale-invariant)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,))
    main = layers.LayerNormalization(name="ln")(
        layers.Dense(8, use_bias=False, name="main")(inputs)
    )
    tiny = layers.Rescaling(1e-7)(layers.Dense(8, use_bias=False, name="tiny")(inputs))
    x = layers.Add()([main, tiny])
    outputs = layers.Dense(3, name="head", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras_adamp.AdamP(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def residual_batch():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(16, 8)).astype("float32"),
        rng.integers(0, 3, 16).astype("int32"),
    )


def test_mixed_float16_report_gives_the_float32_decision(mixed_float16):
    x, y = residual_batch()
    keras.config.set_dtype_policy("float32")
    reference = residual_model()
    expected = {
        r.path: r.decision for r in diagnostics.scale_invariance_report(reference, x, y)
    }
    keras.config.set_dtype_policy("mixed_float16")
    model = residual_model()
    model.set_weights(reference.get_weights())
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    rows = {
        r.path: r.decision for r in diagnostics.scale_invariance_report(model, x, y)
    }
    assert expected["tiny/kernel"] == diagnostics.NOT_PROJECTED
    assert expected["main/kernel"] == diagnostics.LAYER_WISE
    assert rows == expected
    # Without the loss scale, float16 flushes that gradient to 0, which
    # passes for scale invariance: what the report used to say.
    unscaled = diagnostics.compute_gradients(model, x, y, optimizer=keras_adamp.AdamP())
    index = [v.path for v in model.trainable_variables].index("tiny/kernel")
    assert not np.any(ops.convert_to_numpy(unscaled[index]))
    naive = {
        r.path: r.decision
        for r in diagnostics.scale_invariance_report(
            model, None, None, gradients=unscaled
        )
    }
    assert naive["tiny/kernel"] == diagnostics.CHANNEL_WISE
