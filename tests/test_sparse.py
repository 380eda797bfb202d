"""Sparse gradients on TensorFlow: an Embedding's gradient arrives as
tf.IndexedSlices. AdamP/SGDP densify it (the cosine needs the whole gradient),
so training must equal training on the same gradients made dense, with
clipnorm too, and model.fit must train."""

import keras
import numpy as np
import pytest

from keras_adamp import SGDP
from keras_adamp import AdamP

pytestmark = pytest.mark.tensorflow_only

VOCAB, DIM, LENGTH = 40, 8, 6
OPTIMIZERS = {
    "adamp": lambda **kw: AdamP(learning_rate=0.01, weight_decay=0.01, **kw),
    "sgdp": lambda **kw: SGDP(
        learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw
    ),
}


def embedding_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM),
            keras.layers.LayerNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def data(n=96):
    rng = np.random.default_rng(0)
    # repeated tokens within a batch: IndexedSlices with duplicate indices
    x = rng.integers(0, VOCAB // 2, size=(n, LENGTH)).astype("int32")
    y = (x[:, 0] % 3).astype("int32")  # learnable from the first token
    return x, y


def unique_token_batches(n=48, batch=4):
    """Batches of `batch` rows in which no token repeats."""
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.permutation(VOCAB)[: batch * LENGTH].reshape(batch, LENGTH)
            for _ in range(n // batch)
        ]
    ).astype("int32")
    return x, (x[:, 0] % 3).astype("int32")


def train_custom(optimizer, densify, steps=12, batch=32, dataset=data):
    import tensorflow as tf

    model = embedding_model()
    x, y = dataset()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kinds = set()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        for g in grads:
            kinds.add(type(g).__name__)  # recorded while tracing
        if densify:
            grads = [tf.convert_to_tensor(g) for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for i in range(steps):
        j = (i * batch) % len(x)
        step(x[j : j + batch], y[j : j + batch])
    return model.get_weights(), kinds


CLIP_CASES = {
    # repeated tokens in every batch
    "plain": ({}, {}),
    # Keras clips IndexedSlices with tf.clip_by_norm, which measures the norm
    # of the slices before repeated indices are summed (for Keras's own
    # optimizers too): equal to the dense gradient's norm when no index
    # repeats, so that is the case where sparse and dense must agree.
    "clipnorm": ({"clipnorm": 0.05}, dict(batch=4, dataset=unique_token_batches)),
}


@pytest.mark.parametrize("case", list(CLIP_CASES))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_indexed_slices_train_like_dense_gradients(optimizer_name, case):
    clip, how = CLIP_CASES[case]
    make = OPTIMIZERS[optimizer_name]
    sparse, kinds = train_custom(make(**clip), densify=False, **how)
    assert "IndexedSlices" in kinds  # the sparse path was really taken
    dense, _ = train_custom(make(**clip), densify=True, **how)
    if clip:  # the clipping really acted
        unclipped, _ = train_custom(make(), densify=True, **how)
        assert np.abs(unclipped[0] - dense[0]).max() > 1e-3
    initial = embedding_model().get_weights()
    assert np.abs(sparse[0] - initial[0]).max() > 1e-2  # embeddings trained
    for a, b in zip(sparse, dense):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_fit_trains_an_embedding_model(optimizer_name):
    model = embedding_model()
    model.compile(
        optimizer=OPTIMIZERS[optimizer_name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(384)
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    # rows of tokens never seen (ids >= VOCAB // 2) get zero gradients, so
    # zero moments: weight decay only shrinks them
    embeddings = model.layers[0].embeddings.numpy()
    initial = embedding_model().layers[0].embeddings.numpy()
    unseen = slice(VOCAB // 2, None)
    assert np.all(np.isfinite(embeddings))
    assert np.all(np.abs(embeddings[unseen]) <= np.abs(initial[unseen]))
    assert np.abs(embeddings[unseen] - initial[unseen]).max() > 0
