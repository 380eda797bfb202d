"""keras_adamp.channel_axes_for: every variable grouped by the output channels
of the layer that owns it; biases never projected; the warnings of the static
rules; fine-tuning with an override naming frozen layers; `channel_layout`'s
errors."""

import functools
import re
import warnings

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import layouts

L = keras.layers

# Building many layer types costs JAX a compilation per initializer shape
# (the zoo: ~45 s on JAX, ~1 s on TensorFlow, ~4 s on torch); the walk and the
# rules are backend-independent Python, so the big models are built on
# TensorFlow and torch only.
not_on_jax = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="backend-independent walk; these models take ~45-75 s to build on "
    "JAX (a compilation per initializer shape), and run on TensorFlow and "
    "torch",
)


def _einsum_kernel_outputs(equation):
    # The kernel's letters that survive into the output are its output axes.
    inputs, output = equation.split("->")
    kernel = inputs.split(",")[1]
    survivors = set(output)
    return tuple(i for i, letter in enumerate(kernel) if letter in survivors)


def _expected_by_attribute(layer):
    """{attribute: output axes} of `layer`'s kernels, from its type and config
    (independently of keras_adamp: read from the layer's attributes)."""
    known = (
        L.EinsumDense,
        L.Conv1D,
        L.Conv2D,
        L.Conv3D,
        L.Conv1DTranspose,
        L.Conv2DTranspose,
        L.Conv3DTranspose,
        L.DepthwiseConv1D,
        L.DepthwiseConv2D,
        L.SeparableConv1D,
        L.SeparableConv2D,
    )
    config = layer.get_config() if isinstance(layer, known) else {}
    if isinstance(layer, L.EinsumDense):
        return {"kernel": _einsum_kernel_outputs(config["equation"])}
    if isinstance(layer, L.Dense):
        return {"kernel": (1,)}
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        return {"kernel": (len(config["kernel_size"]) + 1,)}
    if isinstance(layer, (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)):
        # (*k, out, in): the filters are the second-to-last axis.
        assert layer.kernel.shape[-2] == config["filters"]
        return {"kernel": (len(config["kernel_size"]),)}
    if isinstance(layer, (L.DepthwiseConv1D, L.DepthwiseConv2D)):
        assert layer.kernel.shape[-1] == config["depth_multiplier"]
        rank = len(config["kernel_size"]) + 2
        return {"kernel": (rank - 2, rank - 1)}
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        rank = len(config["kernel_size"]) + 2
        return {
            "depthwise_kernel": (rank - 2, rank - 1),
            "pointwise_kernel": (rank - 1,),
        }
    if isinstance(layer, L.Embedding):
        return {"embeddings": (0,)}
    if type(layer).__name__ == "PositionEmbedding":
        # keras-hub's learned PositionEmbedding: one row per position.
        return {"position_embeddings": (0,)}
    if isinstance(layer, (L.LSTMCell, L.GRUCell, L.SimpleRNNCell)) or (
        type(layer).__name__ == "ConvLSTMCell"
    ):
        return {
            "kernel": (layer.kernel.ndim - 1,),
            "recurrent_kernel": (layer.recurrent_kernel.ndim - 1,),
        }
    return {}


def expected_axes(model):
    """{id(variable): axes or None} for the model's trainable variables, and
    the paths left to the static rules (layers with no kernel rule)."""
    by_id = {}
    every_layer = list(model._flatten_layers(include_self=True, recursive=True))
    for layer in every_layer:
        for attribute, axes in _expected_by_attribute(layer).items():
            by_id[id(getattr(layer, attribute))] = axes
    for layer in every_layer:
        if isinstance(layer, L.MultiHeadAttention):
            # The torch in_proj rows (heads * head_dim) and out_proj rows (d).
            for dense in (layer.query_dense, layer.key_dense, layer.value_dense):
                assert by_id[id(dense.kernel)] == (1, 2)
            assert by_id[id(layer.output_dense.kernel)] == (2,)
    expected, fallback = {}, []
    for v in model.trainable_variables:
        name = v.path.split("/")[-1]
        if len(v.shape) <= 1 or name == "bias":
            expected[id(v)] = None
        elif id(v) in by_id:
            expected[id(v)] = by_id[id(v)]
        elif all(d == 1 for d in v.shape[:-1]):
            # A class token (1, 1, D): the reference's one group.
            expected[id(v)] = ()
        else:
            expected[id(v)] = layouts.default_channel_axes(tuple(v.shape), name)
            fallback.append(v.path)
    return expected, fallback


def assert_channel_axes_match(model):
    expected, fallback = expected_axes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = keras_adamp.channel_axes_for(model)
    mismatches = []
    for v in model.trainable_variables:
        got = result.get("^" + re.escape(v.path) + "$")
        got = None if got is None else tuple(got)
        if got != expected[id(v)]:
            mismatches.append((v.path, tuple(v.shape), got, expected[id(v)]))
    assert mismatches == []
    # Variables of layers with no rule are named in one warning, and only then.
    messages = [str(w.message) for w in caught if "channel_axes_for" in str(w.message)]
    if fallback:
        assert len(messages) == 1
        assert all(f"'{path}'" in messages[0] for path in fallback)
    else:
        assert messages == []
    return result


# -- models ---------------------------------------------------------------


class _Scaled(L.Layer):
    """A custom layer: a Dense sublayer (known) and its own matrix (unknown)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = L.Dense(3, name="inner")

    def build(self, input_shape):
        self.mix = self.add_weight(shape=(3, 3), name="mix")

    def call(self, x):
        return self.inner(x) @ self.mix


@functools.cache
def zoo():
    """Every Keras layer with a kernel, in one functional model with a nested
    Sequential and a custom layer (built once; the tests only read it)."""
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 4))
    x = L.Conv2D(6, 3, groups=2, padding="same")(image)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = L.SeparableConv2D(4, 3, depth_multiplier=3, padding="same")(x)
    x = L.Conv2DTranspose(3, 2, strides=2, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    a = L.GlobalAveragePooling2D()(x)

    seq = keras.Input((6, 4))
    s = L.Conv1D(5, 3, padding="same")(seq)
    s = L.DepthwiseConv1D(3, depth_multiplier=2, padding="same")(s)
    s = L.SeparableConv1D(4, 3, padding="same")(s)
    s = L.Conv1DTranspose(4, 3, padding="same")(s)
    s = L.MultiHeadAttention(num_heads=2, key_dim=3)(s, s)
    s = L.EinsumDense(
        "btd,ndh->btnh", output_shape=(None, 2, 3), bias_axes="nh", name="gemma_query"
    )(s)
    s = L.Reshape((6, 6))(s)
    s = L.LSTM(3, return_sequences=True)(s)
    s = L.GRU(3, return_sequences=True)(s)  # reset_after: a (2, 9) bias
    b = L.Bidirectional(L.SimpleRNN(2))(s)

    vol = keras.Input((4, 4, 4, 2))
    v = L.Conv3D(3, 2)(vol)
    v = L.Conv3DTranspose(2, 2)(v)
    c = L.GlobalAveragePooling3D()(v)

    frames = keras.Input((3, 6, 2))
    f = L.ConvLSTM1D(2, 3)(frames)
    d = L.Flatten()(f)

    tokens = keras.Input((5,), dtype="int32")
    e = L.GlobalAveragePooling1D()(L.Embedding(11, 4)(tokens))

    merged = L.Concatenate()([a, b, c, d, e])
    nested = keras.Sequential([L.Dense(3, name="nested_dense")], name="nested")
    out = _Scaled(name="scaled")(nested(merged))
    return keras.Model([image, seq, vol, frames, tokens], out)


def unet():
    """A tiny U-Net: Conv2DTranspose + BatchNorm on the way up."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    d1 = L.ReLU()(
        L.BatchNormalization()(
            L.Conv2D(4, 3, padding="same", use_bias=False, name="down1")(inputs)
        )
    )
    p = L.MaxPooling2D()(d1)
    d2 = L.ReLU()(
        L.BatchNormalization()(
            L.Conv2D(8, 3, padding="same", use_bias=False, name="down2")(p)
        )
    )
    up = L.Conv2DTranspose(4, 2, strides=2, use_bias=False, name="up")(d2)
    up = L.ReLU()(L.BatchNormalization(name="up_bn")(up))
    x = L.Concatenate()([up, d1])
    x = L.ReLU()(
        L.BatchNormalization()(
            L.Conv2D(4, 3, padding="same", use_bias=False, name="fuse")(x)
        )
    )
    return keras.Model(inputs, L.Conv2D(2, 1, name="logits")(x))


def zoo_paths(model):
    """Paths of the zoo's kernels that the static rules get wrong."""

    def first(cls):
        return next(l for l in model._flatten_layers() if type(l) is cls)

    return {
        "transpose": first(L.Conv2DTranspose).kernel.path,
        "depthwise": first(L.DepthwiseConv2D).kernel.path,
        "gemma": model.get_layer("gemma_query").kernel.path,
        "query": first(L.MultiHeadAttention).query_dense.kernel.path,
        "custom": model.get_layer("scaled").mix.path,
        "conv": first(L.Conv2D).kernel.path,
    }


@not_on_jax
def test_every_keras_layer_with_a_kernel_is_grouped_by_its_layer():
    model = zoo()
    result = assert_channel_axes_match(model)
    paths = zoo_paths(model)
    axes = {k: tuple(result["^" + re.escape(p) + "$"]) for k, p in paths.items()}
    # The ones the static rules get wrong, spelled out.
    assert axes["transpose"] == (2,)
    assert axes["depthwise"] == (2, 3)
    assert axes["gemma"] == (0, 2)
    assert axes["query"] == (1, 2)
    assert axes["custom"] == (1,)  # unknown: the static rule, warned
    assert any("nested_dense/kernel" in key for key in result)
    # Biases of any rank are left out: the MHA's (heads, head_dim) and GRU's.
    assert not any("bias" in key for key in result)


def test_unet_transposed_kernels_are_grouped_by_output_channel():
    model = unet()
    result = assert_channel_axes_match(model)
    assert result["^up/kernel$"] == [2]


@not_on_jax
@pytest.mark.parametrize(
    "name", ["ResNet50", "MobileNetV2", "EfficientNetB0", "ConvNeXtTiny", "vit", "bert"]
)
def test_channel_axes_for_matches_layers_on_real_models(name):
    if name == "vit":
        keras_hub = pytest.importorskip("keras_hub")
        model = keras_hub.models.ViTBackbone(
            image_shape=(8, 8, 3),
            patch_size=4,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            mlp_dim=16,
        )
    elif name == "bert":
        keras_hub = pytest.importorskip("keras_hub")
        model = keras_hub.models.BertBackbone(
            vocabulary_size=50,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=12,
        )
    else:
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(32, 32, 3), include_top=False
        )
    result = assert_channel_axes_match(model)
    if name in ("vit", "bert"):
        qkv = [
            tuple(a) for k, a in result.items() if re.search(r"(query|key|value)", k)
        ]
        assert qkv == [(1, 2)] * 3
    if name == "vit":
        assert result["^vit_patching_and_embedding/class_token$"] == []


# -- the override is accepted, stored and saved ----------------------------


def test_channel_axes_for_round_trips_through_config_and_keras_file(tmp_path):
    model = unet()
    axes = keras_adamp.channel_axes_for(model)
    for cls in (keras_adamp.AdamP, keras_adamp.SGDP):
        config = cls(channel_axes=axes).get_config()
        assert config["channel_axes"] == axes
        assert cls.from_config(config).get_config()["channel_axes"] == axes
    optimizer = keras_adamp.SGDP(channel_axes=axes)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    model.fit(x, np.zeros((2, 8, 8, 2), "float32"), epochs=1, verbose=0)
    model.save(tmp_path / "unet.keras")
    loaded = keras.saving.load_model(tmp_path / "unet.keras")
    assert loaded.optimizer.get_config()["channel_axes"] == axes
    up = loaded.get_layer("up").kernel
    loaded.optimizer.build(loaded.trainable_variables)
    assert loaded.optimizer.channel_layout(up).channel_axes == (2,)


# -- biases ----------------------------------------------------------------


def test_biases_of_any_rank_are_never_projected():
    mha = L.MultiHeadAttention(num_heads=2, key_dim=3)
    mha.build((None, 4, 5), (None, 4, 5))
    biases = [v for v in mha.trainable_variables if v.path.endswith("bias")]
    assert sorted(len(b.shape) for b in biases) == [1, 2, 2, 2]
    # Not by the static rules, nor when a pattern would match them.
    assert layouts.resolve_channel_axes(biases) == [None] * 4
    with pytest.warns(UserWarning, match="match no variable"):
        assert layouts.resolve_channel_axes(biases, {"query": [0]}) == [None] * 4
    optimizer = keras_adamp.AdamP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.build(mha.trainable_variables)
    assert all(optimizer.channel_layout(b) is None for b in biases)


# -- the warning of the static rules ----------------------------------------


def _build_warnings(optimizer, variables):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.build(variables)
    return [str(w.message) for w in caught]


@not_on_jax
def test_a_guessed_grouping_warns_once_at_build_naming_variables_and_fix():
    model = zoo()
    messages = _build_warnings(keras_adamp.AdamP(), model.trainable_variables)
    guessed = [m for m in messages if "guessed" in m]
    assert len(guessed) == 1
    paths = zoo_paths(model)
    for key in ["transpose", "depthwise", "query", "gemma"]:
        assert f"'{paths[key]}'" in guessed[0]
    assert f"'{paths['conv']}'" not in guessed[0]  # a Conv is sure
    assert f"'{paths['custom']}'" not in guessed[0]  # a matrix: (in, out)
    assert "channel_axes=keras_adamp.channel_axes_for(model)" in guessed[0]
    # The fix silences it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = keras_adamp.channel_axes_for(model)
    assert (
        _build_warnings(keras_adamp.SGDP(channel_axes=axes), model.trainable_variables)
        == []
    )


def test_sure_groupings_do_not_warn():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3),
            L.DepthwiseConv2D(3, name="depthwise"),
            L.SeparableConv2D(4, 1),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    assert _build_warnings(keras_adamp.AdamP(), model.trainable_variables) == []


@pytest.mark.parametrize(
    "shape, path",
    [
        ((3, 3, 4, 1), "conv_one_filter/kernel"),  # read as depthwise
        ((64, 2, 16), "block/proj/kernel"),  # no Conv1D has a 64-tap kernel
        ((3, 3, 4, 8), "up/conv2d_transpose/kernel"),
        ((2, 2, 2, 2, 2, 2), "kernel"),
        ((4, 5, 6), "custom/w"),
    ],
)
def test_static_rules_know_when_they_guess(shape, path):
    assert layouts.static_rule_is_a_guess(shape, path)


@pytest.mark.parametrize(
    "shape, path",
    [
        ((4, 5), "custom/w"),  # any matrix reads as Dense's (in, out)
        ((12, 8), "position_embedding/embeddings"),
        ((3, 3, 4, 8), "conv/kernel"),
        ((3, 3, 4, 1), "block_depthwise/kernel"),
        ((2, 4), "attention/bias"),
        ((8,), "gamma"),
    ],
)
def test_static_rules_know_when_they_are_sure(shape, path):
    assert not layouts.static_rule_is_a_guess(shape, path)


# -- fine-tuning -----------------------------------------------------------


def test_an_override_naming_only_frozen_layers_is_ignored_with_a_warning():
    model = unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = keras_adamp.channel_axes_for(model)  # all layers trainable
    for name in ("down1", "down2", "up", "fuse"):
        model.get_layer(name).trainable = False
    optimizer = keras_adamp.AdamP(channel_axes={**axes, "down": [-1]})
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(model.get_layer("logits").kernel)
    with pytest.warns(UserWarning, match=r"'down'.*match no variable.*ignored"):
        model.fit(x, np.ones((2, 8, 8, 2), "float32"), epochs=1, verbose=0)
    after = keras.ops.convert_to_numpy(model.get_layer("logits").kernel)
    assert not np.allclose(before, after)
    assert optimizer.channel_layout(model.get_layer("logits").kernel).channel_axes == (
        3,
    )


# -- channel_layout --------------------------------------------------------


def test_channel_layout_before_build_and_its_errors():
    model = unet()
    kernel = model.get_layer("up").kernel
    optimizer = keras_adamp.AdamP(channel_axes={"up/kernel": -2})
    # Before build: the layout build will give it.
    assert optimizer.channel_layout(kernel).channel_axes == (2,)
    assert optimizer.channel_layout(model.get_layer("logits").bias) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.build(model.trainable_variables[:2])
    with pytest.raises(
        ValueError, match=r"'up/kernel' \(2, 2, 4, 8\) is not one of the 2"
    ):
        optimizer.channel_layout(kernel)
    with pytest.raises(ValueError, match="Adam groups no variable"):
        layouts.channel_layout(keras.optimizers.Adam(), kernel)


def test_subclassed_model_with_its_own_variable():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.up = L.Conv2DTranspose(3, 2, name="up")
            self.blocks = [
                L.Dense(4, name="d0"),
                L.EinsumDense("ab,bc->ac", (5,), name="e0"),
            ]

        def build(self, input_shape):
            self.mix = self.add_weight(shape=(2, 3, 4), name="mix")

        def call(self, x):
            x = self.up(x)
            return self.blocks[1](self.blocks[0](x[:, 0, 0, :]))

    model = Net()
    model(np.zeros((1, 4, 4, 2), "float32"))
    with pytest.warns(UserWarning, match=r"mix' \(2, 3, 4\) of Net"):
        result = keras_adamp.channel_axes_for(model)
    by_path = {
        v.path: result.get("^" + re.escape(v.path) + "$")
        for v in model.trainable_variables
    }
    assert by_path == {
        model.up.kernel.path: [2],
        model.up.bias.path: None,
        model.blocks[0].kernel.path: [1],
        model.blocks[0].bias.path: None,
        model.blocks[1].kernel.path: [1],
        model.mix.path: [2],
    }


def test_channel_layout_through_a_loss_scale_optimizer():
    model = unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = keras_adamp.channel_axes_for(model)
    scaled = keras.optimizers.LossScaleOptimizer(keras_adamp.SGDP(channel_axes=axes))
    scaled.build(model.trainable_variables)
    layout = layouts.channel_layout(scaled, model.get_layer("up").kernel)
    assert layout.channel_axes == (2,) and layout.num_channels == 4


@not_on_jax
@pytest.mark.parametrize("cls", [keras_adamp.AdamS, keras_adamp.SGDMRT])
def test_spherical_optimizers_warn_only_about_kernels_they_designate(cls):
    # The spherical optimizers step a variable they do not designate as plain
    # Adam/SGD: its grouping is unused, and a guessed one is no reason to warn.
    model = zoo()
    paths = zoo_paths(model)
    conv = f"^{re.escape(paths['conv'])}$"
    messages = _build_warnings(
        cls(learning_rate=0.01, spherical=conv), model.trainable_variables
    )
    assert not [m for m in messages if "guessed" in m], messages
    # Designating a kernel whose grouping is guessed still warns, naming it.
    query = f"^{re.escape(paths['query'])}$"
    messages = _build_warnings(
        cls(learning_rate=0.01, spherical=f"{conv}|{query}"),
        model.trainable_variables,
    )
    guessed = [m for m in messages if "guessed" in m]
    assert len(guessed) == 1 and f"'{paths['query']}'" in guessed[0], messages
    assert f"'{paths['transpose']}'" not in guessed[0]
    assert guessed[0].startswith(cls.__name__)
