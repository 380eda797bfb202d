"""Zero-size variables, (0, 3), (3, 0) and (0,), step as a no-op with every
optimizer of the package, as Keras's AdamW and SGD step them: no error, their
slots kept (of their shape), and the variables beside them train exactly as
they would without them. Compiled (XLA on TensorFlow and JAX, torch.compile
on torch) and not."""

import warnings

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import layouts

EMPTY_SHAPES = ((0, 3), (3, 0), (0,))

OPTIMIZERS = {
    "AdamP": lambda: keras_adamp.AdamP(learning_rate=0.01, weight_decay=0.1),
    "SGDP": lambda: keras_adamp.SGDP(
        learning_rate=0.05, momentum=0.9, weight_decay=0.01
    ),
    # Everything designated: the zero-size variables too, by the pattern.
    "AdamS": lambda: keras_adamp.AdamS(learning_rate=0.01, spherical=".*kernel"),
    "AdamSRT": lambda: keras_adamp.AdamSRT(learning_rate=0.01, spherical=".*kernel"),
    "SGDMRT": lambda: keras_adamp.SGDMRT(
        learning_rate=0.05, momentum=0.9, spherical=".*kernel"
    ),
}


class WithEmpty(keras.layers.Layer):
    """A Dense whose output also reads zero-size kernels (their gradients are
    zero-size too)."""

    def __init__(self, units, empty, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.empty = empty

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), name="kernel"
        )
        self.empties = [
            self.add_weight(shape=shape, initializer="ones", name=f"e{i}_kernel")
            for i, shape in enumerate(self.empty)
        ]

    def call(self, x):
        y = keras.ops.matmul(x, self.kernel)
        for e in self.empties:
            y = y + keras.ops.sum(e)
        return keras.ops.tanh(y)


def train(make_optimizer, empty, jit_compile):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            WithEmpty(5, empty, name="body"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, name="head"),
        ]
    )
    initial = [np.array(v.numpy()) for v in model.trainable_variables]
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AdamS & co.: designations
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model, optimizer, initial


@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_size_variables_step_as_a_no_op(name, jit_compile):
    model, optimizer, _ = train(OPTIMIZERS[name], EMPTY_SHAPES, jit_compile)
    twin, _, initial = train(OPTIMIZERS[name], (), jit_compile)
    assert int(optimizer.iterations) == 4
    body = model.get_layer("body")
    assert [tuple(e.shape) for e in body.empties] == list(EMPTY_SHAPES)
    for e in body.empties:
        # Never projected, never on a sphere.
        assert optimizer.channel_layout(e) is None
    # Slots are kept, of the variables' own shape.
    slot_shapes = [tuple(v.shape) for v in optimizer.variables]
    for shape in EMPTY_SHAPES:
        assert shape in slot_shapes
    # The other variables trained, exactly as without the empty ones.
    trained = [v for v in model.trainable_variables if np.size(v.numpy())]
    assert len(trained) == len(twin.trainable_variables) == len(initial)
    for got, want, start in zip(trained, twin.trainable_variables, initial):
        got, want = np.array(got.numpy()), np.array(want.numpy())
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert not np.allclose(got, start)


@pytest.mark.parametrize("shape", EMPTY_SHAPES + ((0, 0, 4), (2, 0, 1)))
def test_zero_size_layouts_divide_by_nothing(shape):
    rank = len(shape)
    for axes in ((), (rank - 1,), tuple(range(rank))):
        layout = layouts.ChannelLayout.create(shape, axes)
        assert layout.numel == 0
        assert layout.group_size * layout.num_channels == 0
    variable = keras.Variable(np.zeros(shape, "float32"), name="kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never projected: no guess to warn of
        assert layouts.resolve_channel_axes([variable]) == [None]
    assert layouts.resolve_channel_axes([variable], {"kernel": -1}, warn=False) == [
        None
    ]
