"""What the tests share: scikit-learn's bundled 8x8 digits (ships with the
package, no download), a small Conv+BatchNorm CNN (AdamP's case), and one
optimizer step that is stateless on JAX; and the filter for the warning
about output channels guessed from a shape, which free variables (no layer)
trigger."""

import keras
import pytest

# For tests whose variables have no layer: their output channels are guessed
# from the shape (the rule those tests mean), with a UserWarning.
ignore_guessed_channels = pytest.mark.filterwarnings(
    "ignore:.*output channels of .* guessed:UserWarning"
)


def digits(n=None, flat=False):
    """The first `n` digits scaled to [0, 1]: images `(n, 8, 8, 1)`, or
    vectors `(n, 64)` with `flat=True`; int32 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    x = x.reshape(len(x), 64) if flat else x[..., None]
    y = data.target.astype("int32")
    return (x[:n], y[:n]) if n else (x, y)


def conv_bn_model(seed=0, logits_dtype=None, epsilon=1e-3):
    """Two bias-free convolutions, each followed by BatchNorm (with
    `epsilon`, Keras's default 1e-3 unless given), and a Dense head
    (`logits_dtype="float32"` keeps the logits in float32 under a mixed
    policy, as the mixed-precision guide recommends)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(epsilon=epsilon),
            keras.layers.ReLU(),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(epsilon=epsilon),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, dtype=logits_dtype),
        ]
    )


def apply(optimizer, grads, variables):
    """optimizer.apply, through stateless_apply on JAX (lax.cond cannot
    assign Keras variables eagerly; Keras's own LossScaleOptimizer and
    MultiOptimizer tests apply statelessly there), building it first."""
    grads = [keras.ops.convert_to_tensor(g) for g in grads]
    if keras.backend.backend() != "jax":
        optimizer.apply(grads, variables)
        return
    if not optimizer.built:
        optimizer.build(variables)
    new_vars, new_opt_vars = optimizer.stateless_apply(
        [v.value for v in optimizer.variables],
        grads,
        [v.value for v in variables],
    )
    for v, value in zip(variables, new_vars):
        v.assign(value)
    for v, value in zip(optimizer.variables, new_opt_vars):
        v.assign(value)
