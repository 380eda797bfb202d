"""Keras-style tests of AdamP and SGDP: config, single step, weight decay,
clipping, EMA, learning-rate schedules (against the oracle)."""

import importlib.metadata
import inspect
import os
import re

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import SGDP
from keras_adamp import AdamP

OPTIMIZERS = [AdamP, SGDP]


def numpy_of(variable):
    return keras.ops.convert_to_numpy(variable.value)


def kernel_variable(value, name="kernel"):
    return keras.Variable(np.asarray(value, dtype="float32"), name=name)


# --- config and serialization -------------------------------------------------

NON_DEFAULT = {
    AdamP: dict(
        learning_rate=0.02,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-6,
        weight_decay=0.01,
        delta=0.2,
        wd_ratio=0.5,
        nesterov=True,
        channel_axes={"transpose": -2, "einsum": [1, 2]},
        clipnorm=1.5,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=5,
        loss_scale_factor=128.0,
        gradient_accumulation_steps=3,
        name="my_adamp",
    ),
    SGDP: dict(
        learning_rate=0.2,
        momentum=0.8,
        dampening=0.0,
        nesterov=True,
        epsilon=1e-6,
        weight_decay=1e-4,
        delta=0.05,
        wd_ratio=0.2,
        channel_axes={"transpose": [-2]},
        global_clipnorm=2.0,
        name="my_sgdp",
    ),
}


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_config_round_trip_keeps_every_argument(cls):
    optimizer = cls(**NON_DEFAULT[cls])
    config = optimizer.get_config()
    signature = inspect.signature(cls.__init__).parameters
    arguments = {n for n, p in signature.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    assert arguments - {"self"} <= set(config), "an argument is not in get_config"
    restored = cls.from_config(config)
    assert restored.get_config() == config
    for key, value in NON_DEFAULT[cls].items():
        if key == "channel_axes":
            # Exact, and as plain ints (the config must be JSON-serializable).
            expected = {k: [int(a) for a in np.atleast_1d(v)] for k, v in value.items()}
            assert config[key] == expected, key
        else:
            assert config[key] == pytest.approx(value), key


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_serialize_deserialize_by_registered_name(cls):
    optimizer = cls(**NON_DEFAULT[cls])
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == f"keras_adamp>{cls.__name__}"
    restored = keras.optimizers.deserialize(serialized)
    assert type(restored) is cls
    assert restored.get_config() == optimizer.get_config()


def test_defaults_are_the_reference_defaults():
    adamp = AdamP()
    assert float(adamp.learning_rate) == pytest.approx(1e-3)
    assert (adamp.beta_1, adamp.beta_2) == (0.9, 0.999)
    assert (adamp.epsilon, adamp.weight_decay, adamp.delta, adamp.wd_ratio) == (
        1e-8,
        0.0,
        0.1,
        0.1,
    )
    assert adamp.nesterov is False
    sgdp = SGDP()
    assert float(sgdp.learning_rate) == pytest.approx(0.01)
    assert (sgdp.momentum, sgdp.dampening, sgdp.nesterov) == (0.0, 0.0, False)
    assert (sgdp.epsilon, sgdp.delta, sgdp.wd_ratio) == (1e-8, 0.1, 0.1)


def test_version_matches_the_package_metadata():
    # The latest release in the changelog is the package's version ...
    changelog = os.path.join(os.path.dirname(__file__), os.pardir, "CHANGELOG.md")
    with open(changelog, encoding="utf-8") as handle:
        released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", handle.read(), re.MULTILINE)
    assert keras_adamp.__version__ == released[0]
    # ... and, where this tree is installed, the installed metadata's.
    try:
        installed = importlib.metadata.version("keras-adamp")
    except importlib.metadata.PackageNotFoundError:
        return
    assert installed == keras_adamp.__version__


# --- single steps, checked against the formulas ---------------------------------


def test_adamp_single_step_on_a_bias_is_adam():
    # First Adam step: m_hat / sqrt(v_hat) = g / |g|, so w <- w - lr * sign(g).
    bias = kernel_variable([1.0, -2.0, 3.0], name="bias")
    gradient = np.array([0.5, -0.25, 2.0], dtype="float32")
    AdamP(learning_rate=0.1).apply([gradient], [bias])
    np.testing.assert_allclose(numpy_of(bias), [0.9, -1.9, 2.9], rtol=1e-6, atol=1e-6)


def test_adamp_single_step_removes_the_radial_part_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3)).astype("float32")  # Dense (in=5, out=3)
    g = rng.standard_normal((5, 3))
    g -= w * (g * w).sum(0) / (w * w).sum(0)  # orthogonal to every output column
    variable = kernel_variable(w)
    AdamP(learning_rate=0.1).apply([g.astype("float32")], [variable])
    u = np.sign(g)  # Adam's first update
    w_n = w / (np.linalg.norm(w, axis=0) + 1e-8)
    u = u - w_n * (w_n * u).sum(0)
    np.testing.assert_allclose(numpy_of(variable), w - 0.1 * u, rtol=1e-5, atol=1e-6)


def test_sgdp_single_step_on_a_bias_is_sgd():
    bias = kernel_variable([1.0, -2.0], name="bias")
    SGDP(learning_rate=0.5, momentum=0.9).apply(
        [np.array([0.2, 0.4], "float32")], [bias]
    )
    np.testing.assert_allclose(numpy_of(bias), [0.9, -2.2], rtol=1e-6)


def test_sgdp_without_nesterov_stores_the_projected_buffer():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 2)).astype("float32")
    g = rng.standard_normal((4, 2))
    g -= w * (g * w).sum(0) / (w * w).sum(0)
    variable = kernel_variable(w)
    optimizer = SGDP(learning_rate=0.1, momentum=0.9)
    optimizer.apply([g.astype("float32")], [variable])
    buffer = keras.ops.convert_to_numpy(optimizer._momentums[0])
    w_n = w / (np.linalg.norm(w, axis=0) + 1e-8)
    projected = g - w_n * (w_n * g).sum(0)
    np.testing.assert_allclose(buffer, projected, rtol=1e-5, atol=1e-6)
    assert np.abs((buffer * w).sum(0)).max() < 1e-5


def test_sgdp_without_momentum_has_no_slot_like_keras_sgd():
    variable = kernel_variable(np.ones((2, 2)))
    optimizer = SGDP(learning_rate=0.1)
    optimizer.build([variable])
    assert len(optimizer.variables) == len(keras.optimizers.SGD().variables)
    with_momentum = SGDP(momentum=0.9)
    with_momentum.build([variable])
    assert len(with_momentum.variables) == len(optimizer.variables) + 1


def test_adamp_has_adams_slots():
    variables = [kernel_variable(np.ones((3, 2))), kernel_variable([1.0], "bias")]
    ours, keras_adam = AdamP(), keras.optimizers.Adam()
    ours.build(variables)
    keras_adam.build(variables)
    assert [tuple(v.shape) for v in ours.variables] == [
        tuple(v.shape) for v in keras_adam.variables
    ]


# --- weight decay ----------------------------------------------------------------


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_weight_decay_is_scaled_by_wd_ratio_only_when_projected(cls):
    # A zero gradient gives cos = 0: a kernel is projected (decay * wd_ratio);
    # a bias (rank 1) is never projected (full decay).
    kernel = kernel_variable(np.full((3, 2), 2.0))
    bias = kernel_variable([2.0, 2.0], name="bias")
    optimizer = cls(learning_rate=0.1, weight_decay=0.5, wd_ratio=0.2)
    zeros = [np.zeros((3, 2), "float32"), np.zeros(2, "float32")]
    optimizer.apply(zeros, [kernel, bias])
    np.testing.assert_allclose(numpy_of(kernel), 2.0 * (1 - 0.1 * 0.5 * 0.2))
    np.testing.assert_allclose(numpy_of(bias), 2.0 * (1 - 0.1 * 0.5))


def test_sgdp_decay_is_divided_by_one_minus_momentum():
    bias = kernel_variable([1.0], name="bias")
    SGDP(learning_rate=0.1, momentum=0.5, weight_decay=0.2).apply(
        [np.zeros(1, "float32")], [bias]
    )
    np.testing.assert_allclose(numpy_of(bias), [1 - 0.1 * 0.2 / 0.5], rtol=1e-6)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_exclude_from_weight_decay(cls):
    by_name = kernel_variable([1.0], name="excluded_by_name")
    by_object = kernel_variable([1.0], name="excluded_by_object")
    decayed = kernel_variable([1.0], name="decayed")
    optimizer = cls(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_list=[by_object], var_names=["by_name"])
    zeros = [np.zeros(1, "float32")] * 3
    optimizer.apply(zeros, [by_name, by_object, decayed])
    assert numpy_of(by_name) == pytest.approx([1.0])
    assert numpy_of(by_object) == pytest.approx([1.0])
    assert numpy_of(decayed) == pytest.approx([1.0 - 0.1 * 0.5])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_no_weight_decay_by_default(cls):
    bias = kernel_variable([1.0], name="bias")
    cls(learning_rate=0.1).apply([np.zeros(1, "float32")], [bias])
    assert numpy_of(bias) == pytest.approx([1.0])


# --- clipping, EMA ---------------------------------------------------------------


def _trajectory(optimizer, gradients, shape=(4, 3)):
    variable = kernel_variable(np.random.default_rng(3).standard_normal(shape))
    for gradient in gradients:
        optimizer.apply([gradient], [variable])
    return numpy_of(variable)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_clipnorm_equals_stepping_with_clipped_gradients(cls):
    rng = np.random.default_rng(4)
    gradients = [10 * rng.standard_normal((4, 3)).astype("float32") for _ in range(3)]
    clipped = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in gradients]
    kwargs = dict(learning_rate=0.05)
    if cls is SGDP:
        kwargs["momentum"] = 0.9
    actual = _trajectory(cls(clipnorm=1.0, **kwargs), gradients)
    expected = _trajectory(cls(**kwargs), clipped)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(actual, _trajectory(cls(**kwargs), gradients))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_clipvalue_equals_stepping_with_clipped_gradients(cls):
    rng = np.random.default_rng(5)
    gradients = [rng.standard_normal((4, 3)).astype("float32") for _ in range(3)]
    clipped = [np.clip(g, -0.3, 0.3) for g in gradients]
    kwargs = dict(learning_rate=0.05)
    actual = _trajectory(cls(clipvalue=0.3, **kwargs), gradients)
    expected = _trajectory(cls(**kwargs), clipped)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_ema_keeps_the_moving_average_of_the_weights(cls):
    rng = np.random.default_rng(6)
    variable = kernel_variable(rng.standard_normal((4, 3)))
    optimizer = cls(learning_rate=0.05, use_ema=True, ema_momentum=0.7)
    average = None
    for _ in range(4):
        optimizer.apply([rng.standard_normal((4, 3)).astype("float32")], [variable])
        w = numpy_of(variable)
        average = w if average is None else 0.7 * average + 0.3 * w
    assert not np.allclose(numpy_of(variable), average)
    optimizer.finalize_variable_values([variable])
    np.testing.assert_allclose(numpy_of(variable), average, rtol=1e-5, atol=1e-6)


# --- learning-rate schedule, against the oracle -----------------------------------


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_learning_rate_schedule_matches_reference_with_the_same_rates(cls, oracle):
    torch, adamp = oracle
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    )
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((6, 4)).astype("float32")  # Keras Dense (in, out)
    variable = kernel_variable(w0)
    param = torch.nn.Parameter(torch.from_numpy(w0.T.copy()))
    if cls is AdamP:
        ours = AdamP(learning_rate=schedule, weight_decay=0.1)
        reference = adamp.AdamP([param], lr=0.05, weight_decay=0.1)
    else:
        ours = SGDP(learning_rate=schedule, momentum=0.9, weight_decay=0.1)
        reference = adamp.SGDP([param], lr=0.05, momentum=0.9, weight_decay=0.1)
    for step in range(8):
        for group in reference.param_groups:
            group["lr"] = float(schedule(step))
        g = rng.standard_normal((6, 4)).astype("float32")
        param.grad = torch.from_numpy(g.T.copy())
        reference.step()
        ours.apply([g], [variable])
    expected = param.detach().numpy().T
    np.testing.assert_allclose(numpy_of(variable), expected, rtol=1e-5, atol=1e-6)
