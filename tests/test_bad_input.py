"""Bad `channel_axes` overrides are reported when the optimizer is built, that
is when a model first trains, with a ValueError naming the variable and its
shape, before any step is taken. A pattern that matches no trainable variable
is not an error (its layers may be frozen): it is ignored with a warning
naming it and the variables it could have matched."""

import keras
import numpy as np
import pytest

from keras_adamp import SGDP
from keras_adamp import AdamP


def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(4, name="head"),
        ]
    )


def fit_once(optimizer):
    model = small_model()
    model.compile(optimizer=optimizer, loss="mse")
    before = [w.copy() for w in model.get_weights()]
    x = np.ones((4, 6, 6, 2), "float32")
    y = np.zeros((4, 4), "float32")
    try:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    finally:
        # Whatever happens, no step may have run on a half-built optimizer.
        for a, b in zip(model.get_weights(), before):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_override_naming_no_variable_warns_naming_the_variables(cls):
    optimizer = cls(channel_axes={"conv_transpose": -2})
    model = small_model()
    model.compile(optimizer=optimizer, loss="mse")
    # The message names the unmatched pattern and every candidate with its shape.
    with pytest.warns(
        UserWarning,
        match=r"'conv_transpose'.*match no variable.*ignored.*"
        r"conv/kernel' \(3, 3, 2, 3\).*head/kernel' \(48, 4\)",
    ):
        model.fit(
            np.ones((4, 6, 6, 2), "float32"),
            np.zeros((4, 4), "float32"),
            epochs=1,
            verbose=0,
        )


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("axes", [4, -5, [3, 4]])
def test_override_axis_out_of_range_raises_naming_variable_and_shape(cls, axes):
    optimizer = cls(channel_axes={"conv/kernel": axes})
    with pytest.raises(
        ValueError,
        match=r"Variable '[^']*conv/kernel'.*out of range.*\(3, 3, 2, 3\)",
    ):
        fit_once(optimizer)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_override_matching_only_a_bias_is_reported(cls):
    # Biases are never projected: a pattern matching only a bias would
    # silently do nothing, so it counts as matching no variable.
    optimizer = cls(channel_axes={"head/bias": 0})
    variables = small_model().trainable_variables
    with pytest.warns(UserWarning, match=r"'head/bias'.*match no variable"):
        optimizer.build(variables)
    assert optimizer.channel_layout(variables[-1]) is None


def test_a_valid_override_trains():
    fit_once_ok = AdamP(channel_axes={"head/kernel": [], "conv/kernel": [-1]})
    model = small_model()
    model.compile(optimizer=fit_once_ok, loss="mse")
    x = np.ones((4, 6, 6, 2), "float32")
    model.fit(x, np.zeros((4, 4), "float32"), epochs=1, verbose=0)
    layouts = {
        v.path.split("/", 1)[1]: fit_once_ok.channel_layout(v)
        for v in model.trainable_variables
    }
    assert layouts["head/kernel"].num_channels == 1
    assert layouts["conv/kernel"].num_channels == 3
