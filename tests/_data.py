"""Data and a model the tests share: scikit-learn's bundled 8x8 digits (ships
with the package, no download) and a small Conv+BatchNorm CNN, AdamP's case."""

import keras


def digits(n=None, flat=False):
    """The first `n` digits scaled to [0, 1]: images `(n, 8, 8, 1)`, or
    vectors `(n, 64)` with `flat=True`; int32 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    x = x.reshape(len(x), 64) if flat else x[..., None]
    y = data.target.astype("int32")
    return (x[:n], y[:n]) if n else (x, y)


def conv_bn_model(seed=0, logits_dtype=None):
    """Two bias-free convolutions, each followed by BatchNorm, and a Dense
    head (`logits_dtype="float32"` keeps the logits in float32 under a mixed
    policy, as the mixed-precision guide recommends)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, dtype=logits_dtype),
        ]
    )
