"""The projection and the layout rules, on their own (no optimizer)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_adamp import AdamP
from keras_adamp import projection
from keras_adamp.projection import ChannelLayout


def variables_of(layer, input_shape):
    layer.build(input_shape)
    return {v.name: v for v in layer.weights}


@pytest.mark.parametrize(
    "layer, input_shape, variable, groups, group_size",
    [
        (keras.layers.Dense(6), (None, 10), "kernel", 6, 10),
        (keras.layers.Conv1D(6, 3), (None, 8, 4), "kernel", 6, 12),
        (keras.layers.Conv2D(6, 3), (None, 8, 8, 4), "kernel", 6, 36),
        (keras.layers.Conv3D(4, 2), (None, 4, 4, 4, 3), "kernel", 4, 24),
        (keras.layers.DepthwiseConv1D(3), (None, 8, 5), "kernel", 5, 3),
        (keras.layers.DepthwiseConv2D(3), (None, 8, 8, 5), "kernel", 5, 9),
        (keras.layers.SeparableConv2D(4, 3), (None, 8, 8, 5), "depthwise_kernel", 5, 9),
        (
            keras.layers.SeparableConv2D(4, 3, depth_multiplier=2),
            (None, 8, 8, 5),
            "depthwise_kernel",
            10,
            9,
        ),
        (keras.layers.SeparableConv2D(4, 3), (None, 8, 8, 5), "pointwise_kernel", 4, 5),
        (keras.layers.Embedding(12, 6), (None,), "embeddings", 12, 6),
    ],
)
def test_default_layout_groups_by_the_keras_output_channel(
    layer, input_shape, variable, groups, group_size
):
    v = variables_of(layer, input_shape)[variable]
    axes = projection.default_channel_axes(tuple(v.shape), v.name)
    layout = ChannelLayout.create(tuple(v.shape), axes)
    assert (layout.num_channels, layout.group_size) == (groups, group_size)


def test_rank_one_variables_are_never_projected():
    assert projection.default_channel_axes((7,), "bias") is None
    assert projection.default_channel_axes((), "scalar") is None


def test_override_sets_conv_transpose_output_channel():
    v = variables_of(keras.layers.Conv2DTranspose(5, 3), (None, 8, 8, 3))["kernel"]
    assert tuple(v.shape) == (3, 3, 5, 3)  # (*k, out, in)
    (layout,) = projection.resolve_channel_axes([v], {"conv2d_transpose": -2})
    assert layout.channel_axes == (2,) and layout.view == (9, 5, 3)
    assert layout.reduce_axes == (0, 2)
    assert (layout.num_channels, layout.group_size) == (5, 27)


def test_override_of_an_empty_axis_list_is_the_layer_view():
    layout = ChannelLayout.create((4, 5), [])
    assert (layout.num_channels, layout.group_size) == (1, 20)


def test_whole_tensor_group_projects_the_tensor_not_each_element():
    # One group: the update loses only its component along w as a whole, so
    # it stays orthogonal to w but is not zeroed element by element.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 5)).astype("float32")
    g = rng.standard_normal((4, 5))
    g = (g - w * (g * w).sum() / (w * w).sum()).astype("float32")
    u = rng.standard_normal((4, 5)).astype("float32")
    layout = ChannelLayout.create(w.shape, [])
    projected, _ = projection.project(w, g, u, layout, 0.1, 0.1, 1e-8)
    projected = ops.convert_to_numpy(projected)
    expected = u - w * (w * u).sum() / (w * w).sum()
    np.testing.assert_allclose(projected, expected, rtol=1e-5, atol=1e-6)


def test_override_matching_no_variable_warns_naming_the_pattern_and_variables():
    # Ignored, not an error: the layers it names may be frozen (fine-tuning).
    v = variables_of(keras.layers.Dense(3), (None, 2))["kernel"]
    with pytest.warns(
        UserWarning, match=r"'nothing'.*ignored.*dense.*kernel.*\(2, 3\)"
    ):
        (layout,) = projection.resolve_channel_axes([v], {"nothing": -1})
    assert layout.channel_axes == (1,)


def test_override_axis_out_of_range_names_the_variable_and_shape():
    v = variables_of(keras.layers.Dense(3), (None, 2))["kernel"]
    with pytest.raises(ValueError, match=r"dense.*kernel.*axis 2.*\(2, 3\)"):
        projection.resolve_channel_axes([v], {"kernel": 2})


def test_non_contiguous_axes_group_as_the_transposed_kernel_does():
    # A Gemma-style query kernel (heads, d, head_dim): output axes (0, 2).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype("float32")
    layout = ChannelLayout.create(x.shape, (0, 2))
    assert (layout.num_channels, layout.group_size) == (8, 3)
    assert layout.view == (2, 3, 4) and layout.reduce_axes == (1,)
    sums = ops.convert_to_numpy(layout.group_sum(ops.reshape(x, layout.view)))
    # Output axes first, then flattened: channel c = head * head_dim + j.
    expected = np.transpose(x, (0, 2, 1)).reshape(8, 3).sum(axis=1)
    np.testing.assert_allclose(sums, expected, rtol=1e-6)
    back = ops.convert_to_numpy(layout.per_element(ops.arange(8)))
    assert back.shape == (2, 1, 4)
    np.testing.assert_array_equal(back[:, 0, :].reshape(-1), np.arange(8))


def test_override_axes_must_not_repeat():
    with pytest.raises(ValueError, match="repeat"):
        ChannelLayout.create((2, 3, 4), (0, -3))


def test_optimizer_reports_an_unmatched_override_when_built():
    v = variables_of(keras.layers.Dense(3), (None, 2))["kernel"]
    with pytest.warns(UserWarning, match="AdamP: .*'conv'.* match no variable"):
        AdamP(channel_axes={"conv": -1}).build([v])


def orthogonal_per_column(w, rng):
    g = rng.standard_normal(w.shape)
    return (g - w * (g * w).sum(0) / (w * w).sum(0)).astype("float32")


def test_projected_update_is_orthogonal_to_each_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 4)).astype("float32")
    g = orthogonal_per_column(w, rng)
    u = rng.standard_normal((9, 4)).astype("float32")
    layout = ChannelLayout.create(w.shape, -1)
    projected, ratio = projection.project(w, g, u, layout, 0.1, 0.25, 1e-8)
    projected = ops.convert_to_numpy(projected)
    assert float(ratio) == pytest.approx(0.25)
    cos = np.abs((projected * w).sum(0)) / (
        np.linalg.norm(projected, axis=0) * np.linalg.norm(w, axis=0)
    )
    assert cos.max() < 1e-5
    # Only the radial part was removed.
    np.testing.assert_allclose(
        projected - u, w * ((projected - u) / w).mean(0), rtol=1e-4, atol=1e-6
    )


def test_layer_view_is_used_when_only_the_whole_tensor_is_orthogonal():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((9, 4)).astype("float32")
    g = rng.standard_normal((9, 4))
    g = (g - w * (g * w).sum() / (w * w).sum()).astype("float32")
    layout = ChannelLayout.create(w.shape, -1)
    assert int(projection.scale_invariance(w, g, layout, 0.1, 1e-8)) == (
        projection.LAYER_WISE
    )
    projected, ratio = projection.project(w, g, g, layout, 0.1, 0.25, 1e-8)
    projected = ops.convert_to_numpy(projected)
    assert abs((projected * w).sum()) < 1e-5 * np.linalg.norm(
        projected
    ) * np.linalg.norm(w)
    assert np.abs((projected * w).sum(0)).max() > 1e-3  # not per channel
    assert float(ratio) == pytest.approx(0.25)


def test_aligned_gradient_leaves_the_update_alone():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 4)).astype("float32")
    u = rng.standard_normal((9, 4)).astype("float32")
    layout = ChannelLayout.create(w.shape, -1)
    projected, ratio = projection.project(w, w, u, layout, 0.1, 0.25, 1e-8)
    np.testing.assert_array_equal(ops.convert_to_numpy(projected), u)
    assert float(ratio) == 1.0


def test_zero_gradient_or_zero_weight_counts_as_scale_invariant():
    layout = ChannelLayout.create((3, 2), -1)
    ones, zeros = np.ones((3, 2), "float32"), np.zeros((3, 2), "float32")
    assert int(projection.scale_invariance(ones, zeros, layout, 0.1, 1e-8)) == 1
    assert int(projection.scale_invariance(zeros, ones, layout, 0.1, 1e-8)) == 1


def test_threshold_is_delta_over_sqrt_group_size():
    # One channel of 4 elements: cos just below / above delta / sqrt(4).
    w = np.array([[1.0], [0.0], [0.0], [0.0]], "float32")
    layout = ChannelLayout.create((4, 1), -1)
    for cos, expected in [(0.049, projection.CHANNEL_WISE), (0.051, 0)]:
        g = np.array([[cos], [np.sqrt(1 - cos**2)], [0], [0]], "float32")
        assert int(projection.scale_invariance(w, g, layout, 0.1, 1e-8)) == expected


def test_deciding_many_variables_at_once_equals_deciding_each_alone():
    # One optimizer step decides all variables in one set of ops: each
    # variable's outcome (channel-wise, layer-wise, none) and coefficients must
    # not depend on its neighbours. Layouts mixed: channels last, an
    # Embedding's rows, a 4-D kernel, the whole tensor as one group.
    rng = np.random.default_rng(5)
    w = [
        rng.standard_normal(s).astype("float32")
        for s in [(9, 4), (6, 3), (4, 5), (3, 3, 2, 8), (40, 3), (64, 4)]
    ]
    layouts = [
        ChannelLayout.create(w[0].shape, -1),
        ChannelLayout.create(w[1].shape, 0),
        ChannelLayout.create(w[2].shape, -1),
        ChannelLayout.create(w[3].shape, -1),
        ChannelLayout.create(w[4].shape, []),
        ChannelLayout.create(w[5].shape, -1),
    ]
    g = [
        orthogonal_per_column(w[0], rng),  # channel-wise
        rng.standard_normal((6, 3)).astype("float32"),  # not projected
        rng.standard_normal((4, 5)).astype("float32"),
        rng.standard_normal((3, 3, 2, 8)).astype("float32"),
        rng.standard_normal((40, 3)).astype("float32"),
        orthogonal_per_column(w[5], rng),
    ]
    g[2] = g[2] - w[2] * (g[2] * w[2]).sum() / (w[2] * w[2]).sum()  # layer-wise
    u = [rng.standard_normal(x.shape).astype("float32") for x in w]
    sums = [projection.channel_sums(*t, layout) for *t, layout in zip(w, g, u, layouts)]
    together = projection.coefficients(layouts, sums, 0.1, 0.25, 1e-8)
    ratios = []
    for layout, s, (coef, ratio) in zip(layouts, sums, together):
        [(alone, alone_ratio)] = projection.coefficients([layout], [s], 0.1, 0.25, 1e-8)
        np.testing.assert_allclose(
            ops.convert_to_numpy(coef), ops.convert_to_numpy(alone), rtol=1e-6
        )
        assert float(ratio) == float(alone_ratio)
        ratios.append(float(ratio))
    assert ratios[:3] == [0.25, 1.0, 0.25]
    decisions = [
        int(projection.scale_invariance(*t, layout, 0.1, 1e-8))
        for *t, layout in zip(w[:3], g[:3], layouts[:3])
    ]
    assert decisions == [projection.CHANNEL_WISE, 0, projection.LAYER_WISE]
    # Deciding before the update is known, from the test's sums alone, and
    # then each variable's coefficients from its own <w, u>: the same
    # coefficients and ratios (the wrapper's order on TensorFlow). The
    # blocked sums too (on TensorFlow and JAX the (64, 4) kernel's rows are
    # summed in blocks).
    test = [projection.test_sums(x, y, layout) for x, y, layout in zip(w, g, layouts)]
    decided = projection.decisions(layouts, test, 0.1, 0.25, 1e-8)
    for x, z, layout, decision, (coef, ratio) in zip(w, u, layouts, decided, together):
        later = projection.decided_coefficients(
            decision, projection.radial_sums(x, z, layout)
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(later), ops.convert_to_numpy(coef), rtol=1e-6
        )
        assert float(decision.ratio) == float(ratio)
    # The update with the batch's coefficients is `project`'s (on the view and
    # on the variable's own shape).
    for i in (0, 1, 3):
        x, y, z, layout, (coef, _) = w[i], g[i], u[i], layouts[i], together[i]
        projected, _ = projection.project(x, y, z, layout, 0.1, 0.25, 1e-8)
        np.testing.assert_allclose(
            ops.convert_to_numpy(projection.remove_radial(x, z, coef, layout)),
            ops.convert_to_numpy(projected),
            rtol=1e-6,
            atol=1e-7,
        )
