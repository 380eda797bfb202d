"""Peak memory: AdamP keeps exactly Adam's slots and SGDP exactly SGD's."""

import keras
import numpy as np
import pytest

import keras_adamp


def _variables():
    return [
        keras.Variable(np.ones((3, 3, 4, 8), "float32"), name="kernel"),
        keras.Variable(np.ones((8,), "float32"), name="bias"),
        keras.Variable(np.ones((5, 6), "float32"), name="embeddings"),
    ]


def _slot_shapes(optimizer, variables):
    optimizer.build(variables)
    return sorted(tuple(v.shape) for v in optimizer.variables if len(v.shape) > 0)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: keras_adamp.AdamP(weight_decay=1e-2),
            lambda: keras.optimizers.AdamW(weight_decay=1e-2),
        ),
        (
            lambda: keras_adamp.AdamP(nesterov=True),
            lambda: keras.optimizers.Adam(),
        ),
        (
            lambda: keras_adamp.SGDP(momentum=0.9, nesterov=True),
            lambda: keras.optimizers.SGD(momentum=0.9, nesterov=True),
        ),
        (
            lambda: keras_adamp.SGDP(momentum=0.0),
            lambda: keras.optimizers.SGD(momentum=0.0),
        ),
    ],
    ids=["adamp-adamw", "adamp-adam", "sgdp-sgd", "sgdp-no-momentum"],
)
def test_slots_equal_the_base_optimizer(ours, theirs):
    variables = _variables()
    expected = _slot_shapes(theirs(), variables)
    assert _slot_shapes(ours(), _variables()) == expected
    # And the count is what the base optimizer documents: Adam 2, SGD 1 or 0.
    assert len(expected) % len(variables) == 0


def test_adamp_two_slots_per_variable_sgdp_one():
    variables = _variables()
    adamp = keras_adamp.AdamP()
    assert len(_slot_shapes(adamp, variables)) == 2 * len(variables)
    sgdp = keras_adamp.SGDP(momentum=0.9)
    assert len(_slot_shapes(sgdp, _variables())) == len(variables)
