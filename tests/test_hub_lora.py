"""LoRA, keras-hub's standard fine-tuning path (`backbone.enable_lora(rank)`):
`channel_axes_for` groups the LoRA factors of every Keras layer that has
them by their last axis (peft's lora_A (r, in) and lora_B (out, r), grouped
by axis 0), without a warning, and AdamP fine-tunes them.

Also here: the other layer rules met in keras-hub models (PositionEmbedding,
an untied ReversibleEmbedding) and the fallback for a custom variable whose
leading axes all have size 1 (a ViT class token)."""

import contextlib
import re
import warnings

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import layouts

L = keras.layers


def axes_by_path(result, model):
    return {
        v.path: result.get("^" + re.escape(v.path) + "$")
        for v in model.trainable_variables
    }


@contextlib.contextmanager
def no_warnings():
    """A context in which any warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def lora_model(rank):
    """Every Keras layer with `enable_lora`, built, with LoRA enabled."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((4,), dtype="int32")
    images = keras.Input((6, 6, 6, 2))
    e = L.Embedding(20, 6, name="emb")(tokens)  # (b, 4, 6)
    x = L.Dense(5, name="dense")(e)
    x = L.EinsumDense("abc,cde->abde", (4, 2, 3), name="einsum")(x)
    x = L.Conv1D(3, 2, name="conv1d")(L.Reshape((4, 6))(x))
    v = L.Conv3D(3, 3, name="conv3d")(images)  # (b, 4, 4, 4, 3)
    v = L.Conv2D(3, 3, groups=3, name="conv2d")(L.Reshape((4, 4, 12))(v))
    out = L.Concatenate()([L.Flatten()(x), L.Flatten()(v)])
    model = keras.Model([tokens, images], out)
    for name in ("emb", "dense", "einsum", "conv1d", "conv2d", "conv3d"):
        model.get_layer(name).enable_lora(rank)
    return model


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_factors_of_every_keras_layer_group_by_their_last_axis(rank):
    model = lora_model(rank)
    with no_warnings():
        result = keras_adamp.channel_axes_for(model)
        # The static rules are sure of them too: no guess warning at build.
        resolved = layouts.resolve_channel_axes(model.trainable_variables)
    lora = {
        p: a
        for p, a in axes_by_path(result, model).items()
        if p.split("/")[-1] in layouts.LORA_NAMES
    }
    shapes = {v.path: tuple(v.shape) for v in model.trainable_variables}
    assert len(lora) == 12  # a and b of six layers
    for path, axes in lora.items():
        assert axes == [len(shapes[path]) - 1], path
    assert shapes["einsum/lora_kernel_a"] == (5, 2, rank)  # kernel (5, 2, 3)
    assert shapes["conv3d/lora_kernel_a"] == (3, 3, 3, 2, rank)
    assert shapes["conv2d/lora_kernel_a"] == (3, 3, 4, rank)  # in / groups
    assert shapes["emb/lora_embeddings_b"] == (rank, 6)
    for variable, layout in zip(model.trainable_variables, resolved):
        if variable.path in lora:
            assert layout.channel_axes == (len(variable.shape) - 1,)
    # enable_lora froze the kernels: nothing else of rank >= 2 is trained.
    assert set(result) == {"^" + re.escape(p) + "$" for p in lora}


def test_keras_hub_backbone_fine_tunes_with_lora_without_a_warning():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    backbone.enable_lora(2)
    classifier = keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )
    # The frozen weights (not the dropout layers' seed states).
    frozen = {
        v.path: np.array(v.numpy())
        for v in backbone.non_trainable_variables
        if "seed" not in v.path
    }
    with no_warnings():
        channel_axes = keras_adamp.channel_axes_for(classifier)
        optimizer = keras_adamp.AdamP(learning_rate=0.01, channel_axes=channel_axes)
        optimizer.build(classifier.trainable_variables)
    by_path = axes_by_path(channel_axes, classifier)
    lora = {p: a for p, a in by_path.items() if "lora" in p}
    # keras-hub's BERT puts LoRA on the attention's query and value
    # EinsumDense (abc,cde->abde): a (hidden, heads, rank), b (rank, head_dim).
    assert sorted(lora) == [
        f"transformer_layer_0/self_attention_layer/{d}/lora_kernel_{ab}"
        for d in ("query", "value")
        for ab in ("a", "b")
    ]
    for path, axes in lora.items():
        variable = next(v for v in classifier.trainable_variables if v.path == path)
        shape = tuple(variable.shape)
        assert shape == ((8, 2, 2) if path.endswith("_a") else (2, 4))
        assert axes == [len(shape) - 1]
        assert optimizer.channel_layout(variable).channel_axes == (len(shape) - 1,)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 30, size=(16, 6)).astype("int32"),
        "segment_ids": np.zeros((16, 6), "int32"),
        "padding_mask": np.ones((16, 6), "bool"),
    }
    y = np.arange(16) % 2
    before = {v.path: np.array(v.numpy()) for v in classifier.trainable_variables}
    classifier.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(True)
    )
    history = classifier.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    for v in classifier.trainable_variables:
        if "lora_kernel_b" in v.path:  # starts at zero, then learns
            assert not np.allclose(v.numpy(), before[v.path]), v.path
    assert any(p.endswith("query/kernel") for p in frozen)
    for v in backbone.non_trainable_variables:
        if v.path in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path])


class Tokens(L.Layer):
    """A layer with a class token (1, 1, D), as keras-hub's ViT, and other
    variables of its own."""

    def build(self, input_shape):
        d = input_shape[-1]
        self.class_token = self.add_weight(shape=(1, 1, d), name="class_token")
        self.flat_token = self.add_weight(shape=(1, d), name="flat_token")
        self.mix = self.add_weight(shape=(2, 1, d), name="mix")

    def call(self, x):
        token = self.class_token + self.flat_token
        token = keras.ops.broadcast_to(token, (keras.ops.shape(x)[0], 1, x.shape[-1]))
        return keras.ops.concatenate([token, x], axis=1) * keras.ops.sum(self.mix)


def test_a_variable_with_leading_size_one_axes_is_one_group():
    model = keras.Sequential([keras.Input((3, 4)), Tokens(name="tokens")])
    with pytest.warns(UserWarning, match=r"no rule for 1 variable.*mix' \(2, 1, 4\)"):
        result = keras_adamp.channel_axes_for(model)
    by_name = {p.split("/")[-1]: a for p, a in axes_by_path(result, model).items()}
    assert by_name == {
        "class_token": [],
        "flat_token": [],
        "mix": [2],  # no rule: the static one, warned
    }
    layout = layouts.ChannelLayout.create((1, 1, 4), by_name["class_token"])
    assert (layout.num_channels, layout.group_size) == (1, 4)


def test_keras_hub_embedding_rules():
    keras_hub = pytest.importorskip("keras_hub")
    tokens = keras.Input((5,), dtype="int32")
    embedding = keras_hub.layers.ReversibleEmbedding(
        11, 4, tie_weights=False, name="tokens"
    )
    x = embedding(tokens)
    x = x + keras_hub.layers.PositionEmbedding(5, name="positions")(x)
    model = keras.Model(tokens, embedding(x, reverse=True))
    with no_warnings():
        result = keras_adamp.channel_axes_for(model)
    assert axes_by_path(result, model) == {
        "tokens/embeddings": [0],
        "tokens/reverse_embeddings": [1],  # (dim, vocab): one per token
        "positions/embeddings": [0],
    }
