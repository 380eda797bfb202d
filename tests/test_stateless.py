"""`stateless_apply` is pure and steps as `apply` (issue 25).

For every optimizer, three steps of `optimizer.stateless_apply` against
`apply` on twin variables from the same start, with weight decay on, on a
projected (designated) kernel and a bias. The values passed in are either the
variables' own `.value` tensors (on torch, the variables' parameters: the
case where an in-place step writes into the model) or copies. The results
must equal `apply`'s, the tensors passed in must be left as they were, and
so must the optimizer's and the model's variables (`iterations` stays 0).

On torch both the torch executor (which must decline inside the scope) and
the keras.ops path run; on TensorFlow Keras refuses `stateless_apply`, for
its own optimizers as for ours.
"""

import keras
import numpy as np
import pytest
from _data import ignore_guessed_channels

import keras_adamp

pytestmark = ignore_guessed_channels

BACKEND = keras.backend.backend()
STEPS = 3

OPTIMIZERS = {
    "adamp": lambda: keras_adamp.AdamP(0.1, weight_decay=0.1),
    "sgdp": lambda: keras_adamp.SGDP(0.1, momentum=0.9, weight_decay=0.1),
    "sgdp_nesterov": lambda: keras_adamp.SGDP(
        0.1, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "adams": lambda: keras_adamp.AdamS(
        0.1, spherical="kernel", l2=0.01, weight_decay=0.1
    ),
    "adamsrt": lambda: keras_adamp.AdamSRT(
        0.1, spherical="kernel", l2=0.01, weight_decay=0.1
    ),
    "sgdmrt": lambda: keras_adamp.SGDMRT(
        0.1, momentum=0.9, spherical="kernel", l2=0.01, weight_decay=0.1
    ),
}

PATHS = ["executor", "keras_ops"] if BACKEND == "torch" else ["keras_ops"]


def _numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def _variables():
    rng = np.random.default_rng(0)
    with keras.name_scope("dense"):
        kernel = keras.Variable(
            rng.normal(size=(4, 3)).astype("float32"), name="kernel"
        )
        bias = keras.Variable(rng.normal(size=(3,)).astype("float32"), name="bias")
    return [kernel, bias]


def _gradients(weights, rng):
    """Per output channel of the kernel, a gradient nearly orthogonal to its
    weights (the projection fires), and a random one for the bias."""
    kernel = weights[0]
    g = rng.normal(size=kernel.shape)
    g -= kernel * np.sum(g * kernel, 0) / np.sum(kernel * kernel, 0)
    g += 1e-3 * kernel
    return [g.astype("float32"), rng.normal(size=weights[1].shape).astype("float32")]


def _projected(w, g, delta=0.1):
    """Whether every channel of kernel `w` passes AdamP's cosine test for
    `g` (the projection's path is taken, not only the plain one)."""
    cos = (
        np.abs(np.sum(w * g, 0)) / np.linalg.norm(w, axis=0) / np.linalg.norm(g, axis=0)
    )
    return bool(np.all(cos < delta / np.sqrt(w.shape[0])))


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if BACKEND == "torch":
        from keras_adamp import _torch

        monkeypatch.setattr(_torch, "ENABLED", request.param == "executor")
    return request.param


@pytest.mark.skipif(BACKEND == "tensorflow", reason="Keras refuses it on TF")
@pytest.mark.parametrize("copies", [False, True], ids=["own_values", "copies"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stateless_apply_steps_as_apply_and_changes_nothing(name, copies, path):
    model, twin = _variables(), _variables()
    optimizer, reference = OPTIMIZERS[name](), OPTIMIZERS[name]()
    optimizer.build(model)
    reference.build(twin)
    start = [_numpy(v.value) for v in model]
    slots = [_numpy(v.value) for v in optimizer.variables]
    trainable = [v.value for v in model]
    state = [v.value for v in optimizer.variables]
    if copies:
        trainable = [keras.ops.copy(x) for x in trainable]
        state = [keras.ops.copy(x) for x in state]
    passed = list(trainable) + list(state)
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        grads = _gradients([_numpy(v.value) for v in twin], rng)
        assert _projected(_numpy(twin[0].value), grads[0])
        passed_values = [_numpy(x) for x in passed]
        trainable, state = optimizer.stateless_apply(state, grads, trainable)
        reference.apply(grads, twin)
        # The tensors passed in are as they were.
        for before, x in zip(passed_values, passed):
            np.testing.assert_array_equal(_numpy(x), before)
        passed = list(trainable) + list(state)
    for new, v in zip(trainable, twin):
        np.testing.assert_allclose(_numpy(new), _numpy(v.value), rtol=1e-6, atol=1e-6)
    for new, v in zip(state, reference.variables):
        np.testing.assert_allclose(_numpy(new), _numpy(v.value), rtol=1e-6, atol=1e-6)
    # The model's and the optimizer's variables never moved.
    for before, v in zip(start, model):
        np.testing.assert_array_equal(_numpy(v.value), before)
    for before, v in zip(slots, optimizer.variables):
        np.testing.assert_array_equal(_numpy(v.value), before)
    assert int(_numpy(optimizer.iterations)) == 0
    assert int(_numpy(reference.iterations)) == STEPS


@pytest.mark.skipif(BACKEND != "tensorflow", reason="what Keras does on TF")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stateless_apply_is_refused_on_tensorflow_as_by_keras(name):
    model = _variables()
    optimizer = OPTIMIZERS[name]()
    optimizer.build(model)
    grads = _gradients([_numpy(v.value) for v in model], np.random.default_rng(1))
    with pytest.raises(ValueError, match="not supported with the TensorFlow"):
        optimizer.stateless_apply(
            [v.value for v in optimizer.variables], grads, [v.value for v in model]
        )


@pytest.mark.skipif(BACKEND != "torch", reason="the torch executor's query")
def test_the_executor_sees_a_stateless_scope():
    from keras_adamp import _torch

    assert not _torch.in_stateless_scope()
    with keras.StatelessScope():
        assert _torch.in_stateless_scope()
        with keras.StatelessScope():
            assert _torch.in_stateless_scope()
        assert _torch.in_stateless_scope()
    assert not _torch.in_stateless_scope()
