"""keras_adamp.diagnostics: the scale-invariance report (any backend)."""

import keras
import numpy as np
import pytest
from keras import layers, ops

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
    return (rng.normal(size=(16, 6, 6, 2)).astype("float32"),
            rng.integers(0, 3, 16).astype("int32"))


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
    assert conv.max_channel_cos < conv.channel_threshold == pytest.approx(0.1 / np.sqrt(18))
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
    rows = _by_path(diagnostics.scale_invariance_report(model, None, None, gradients=grads))
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
        uncompiled, *_batch(),
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
        model, x, np.zeros((4, 2), "float32"),
        loss=lambda y_true, y_pred: ops.sum(ops.square(y_pred), axis=-1) / 2,
    )
    np.testing.assert_allclose(ops.convert_to_numpy(g), x.T @ (x @ w) / 4, rtol=1e-5)
