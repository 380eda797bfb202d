"""AdamS, AdamSRT and SGDMRT as Keras optimizers: designation, slots,
arguments, decoupled decay, fit under XLA, saving and resuming in a fresh
process. (Equality with the authors' code: test_spherical_parity.py.)"""

import json
import re
import warnings

import keras
import numpy as np
import pytest
from _data import conv_bn_model
from _data import digits
from test_training import _run_python
from test_training import max_relative_error

import keras_adamp
from keras_adamp import SGDMRT
from keras_adamp import AdamS
from keras_adamp import AdamSRT


def _variables():
    return [
        keras.Variable(np.ones((3, 3, 4, 8), "float32"), name="kernel"),
        keras.Variable(np.ones((8,), "float32"), name="bias"),
        keras.Variable(np.ones((5, 6), "float32"), name="head"),
    ]


# -- memory -----------------------------------------------------------------


@pytest.mark.parametrize("cls", [AdamS, AdamSRT])
def test_second_moment_of_a_designated_variable_is_one_value_per_group(cls):
    variables = _variables()
    optimizer = cls(spherical="kernel", channel_axes={"head": []})
    optimizer.build(variables)
    shapes = [tuple(v.shape) for v in optimizer.variables if len(v.shape) > 0]
    # Per variable: the first moment (full size), then the second moment.
    assert shapes == [
        (3, 3, 4, 8),
        (8,),  # designated kernel: v is (C,)
        (8,),
        (8,),  # bias, not designated: Adam's slots
        (5, 6),
        (5, 6),  # head, not designated (its layout is unused)
    ]
    whole = cls(spherical="kernel|head", channel_axes={"head": []})
    whole.build(_variables())
    assert [tuple(v.shape) for v in whole._velocities] == [(8,), (8,), (1,)]
    # A designated rank-1 variable is one group.
    bias = cls(spherical="bias")
    bias.build(_variables())
    assert [tuple(v.shape) for v in bias._velocities] == [(3, 3, 4, 8), (1,), (5, 6)]


def test_sgdmrt_keeps_one_buffer_per_variable_and_none_without_momentum():
    optimizer = SGDMRT(0.1, momentum=0.9, spherical="kernel")
    optimizer.build(_variables())
    assert [tuple(v.shape) for v in optimizer._momentums] == [
        (3, 3, 4, 8),
        (8,),
        (5, 6),
    ]
    plain = SGDMRT(0.1, spherical="kernel")
    plain.build(_variables())
    assert [v for v in plain.variables if len(v.shape) > 0] == []


def test_adamsrt_keeps_about_one_full_slot_per_designated_kernel():
    model = conv_bn_model()
    ours = AdamSRT(spherical=keras_adamp.normalized_kernels(model))
    ours.build(model.trainable_variables)
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    size = lambda opt: sum(int(np.prod(v.shape)) for v in opt.variables)
    kernels = sum(
        int(np.prod(v.shape)) for v in model.trainable_variables if len(v.shape) == 4
    )
    assert size(adam) - size(ours) == kernels - 8 - 16  # their v, less (C,)


# -- which variables are designated ------------------------------------------


def test_normalized_kernels_of_a_sequential_model_are_the_convolutions():
    model = conv_bn_model()
    pattern = keras_adamp.normalized_kernels(model)
    chosen = [v.path for v in model.trainable_variables if re.search(pattern, v.path)]
    assert chosen == [v.path for v in model.trainable_variables if len(v.shape) == 4]
    assert len(chosen) == 2  # not the Dense head, not BatchNorm's gamma/beta
    assert keras_adamp.normalized_kernel_axes(model) == {}
    json.dumps(pattern)  # serializable


def test_normalized_kernels_reads_a_functional_graph():
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, name="to_bn")(inputs)  # bias: BN removes it
    a = layers.BatchNormalization(name="bn")(a)
    b = layers.Conv2D(4, 3, use_bias=False, name="to_bn_and_add")(inputs)
    c = layers.BatchNormalization(name="bn2")(b)
    c = layers.Add()([c, b])  # b is also used raw
    d = layers.Conv2D(4, 3, use_bias=False, name="to_relu_bn")(inputs)
    d = layers.BatchNormalization(name="bn3")(layers.ReLU()(d))  # not directly
    g = layers.Conv2D(4, 3, use_bias=False, name="to_bn_and_op")(inputs)
    g = layers.BatchNormalization(name="bn4")(g) + keras.ops.relu(g)
    h = layers.Conv2D(4, 3, use_bias=False, name="to_bn_and_output")(inputs)
    h_out = layers.BatchNormalization(name="bn5")(h)
    k = layers.Conv2D(4, 3, use_bias=False, name="to_bn_on_rows")(inputs)
    k = layers.BatchNormalization(axis=1, name="bn_rows")(k)  # not channels
    x = layers.Flatten()(layers.Concatenate()([a, c, d, g, h_out, k]))
    e = layers.Dense(6, use_bias=False, name="to_ln")(x)
    e = layers.LayerNormalization(name="ln")(e)
    f = layers.Dense(6, name="biased_to_ln")(x)  # LN keeps the bias
    f = layers.LayerNormalization(name="ln2")(f)
    out = layers.Dense(3, name="head")(layers.Concatenate()([e, f]))
    model = keras.Model(inputs, [out, h])

    pattern = keras_adamp.normalized_kernels(model)
    chosen = sorted(
        v.path for v in model.trainable_variables if re.search(pattern, v.path)
    )
    assert chosen == ["to_bn/kernel", "to_ln/kernel"]
    axes = keras_adamp.normalized_kernel_axes(model)
    assert list(axes.values()) == [[]]
    assert re.search(next(iter(axes)), "to_ln/kernel")
    optimizer = AdamSRT(spherical=pattern, channel_axes=axes)
    optimizer.build(model.trainable_variables)
    by_path = {v.path: v for v in model.trainable_variables}
    assert optimizer.channel_layout(by_path["to_ln/kernel"]).num_channels == 1
    assert optimizer.channel_layout(by_path["to_bn/kernel"]).num_channels == 4
    assert optimizer.channel_layout(by_path["head/kernel"]) is None


def test_normalized_kernels_walks_nested_models():
    inner = keras.Sequential(
        [
            keras.layers.Dense(6, use_bias=False, name="inner_dense"),
            keras.layers.LayerNormalization(name="inner_ln"),
            keras.layers.Dense(6, use_bias=False, name="inner_last"),
        ],
        name="inner",
    )
    inputs = keras.Input((5,))
    x = inner(inputs)
    x = keras.layers.BatchNormalization(name="outer_bn")(x)  # not seen inside
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    pattern = keras_adamp.normalized_kernels(model)
    chosen = [v.path for v in model.trainable_variables if re.search(pattern, v.path)]
    assert [c.split("/")[-2] for c in chosen] == ["inner_dense"]
    axes = keras_adamp.normalized_kernel_axes(model)
    assert [k for k in axes if re.search(k, chosen[0])] and list(axes.values()) == [[]]


def test_normalized_kernels_refuses_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError, match="subclassed"):
        keras_adamp.normalized_kernels(Net())


def test_default_designates_nothing_and_warns_how_to_designate():
    variables = _variables()
    optimizer = AdamSRT()
    with pytest.warns(UserWarning, match="normalized_kernels"):
        optimizer.build(variables)
    assert not any(optimizer.designated(v) for v in variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamSRT(spherical=[]).build(_variables())


def test_a_list_or_a_callable_is_stored_as_the_regex_of_its_paths():
    variables = _variables()
    by_list = AdamS(spherical=[variables[0]])
    with pytest.warns(UserWarning, match="can't be"):
        assert by_list.get_config()["spherical"] is None  # before build
    by_list.build(variables)
    assert by_list.get_config()["spherical"] == "(?:^|/)(?:kernel)$"
    by_callable = SGDMRT(0.1, momentum=0.9, spherical=lambda v: len(v.shape) > 1)
    by_callable.build(variables)
    assert by_callable.spherical == "(?:^|/)(?:kernel|head)$"
    assert [by_callable.designated(v) for v in variables] == [True, False, True]
    config = by_callable.get_config()
    assert SGDMRT.from_config(config).get_config() == config
    with pytest.warns(UserWarning, match="can't be serialized"):
        assert SGDMRT(0.1, spherical=callable).get_config()["spherical"] is None


@pytest.mark.parametrize("cls", [AdamS, AdamSRT])
def test_config_round_trip(cls):
    optimizer = cls(
        learning_rate=0.01,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-7,
        l2=1e-4,
        spherical="conv",
        channel_axes={"conv": [-1]},
        weight_decay=0.01,
        clipnorm=1.0,
    )
    config = optimizer.get_config()
    assert config["spherical"] == "conv" and config["l2"] == 1e-4
    assert cls.from_config(config).get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is cls and restored.get_config() == config


# -- arguments ----------------------------------------------------------------

INVALID = [
    (AdamS, {"learning_rate": -0.1}, "learning_rate"),
    (AdamSRT, {"beta_1": 1.0}, "beta_1"),
    (AdamSRT, {"beta_2": -0.1}, "beta_2"),
    (AdamS, {"epsilon": -1e-8}, "epsilon"),
    (AdamSRT, {"l2": -1e-4}, "l2"),
    (AdamSRT, {"l2": "1e-4"}, "l2"),
    (AdamSRT, {"weight_decay": -0.01}, "weight_decay"),
    (AdamSRT, {"spherical": "(conv"}, "spherical"),
    (AdamSRT, {"spherical": 3}, "spherical"),
    (AdamS, {"spherical": ["conv/kernel"]}, "spherical"),
    (AdamSRT, {"channel_axes": {"kernel": "last"}}, "channel_axes"),
    (SGDMRT, {"learning_rate": -1.0}, "learning_rate"),
    (SGDMRT, {"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
    (SGDMRT, {"learning_rate": 0.1, "dampening": -0.5}, "dampening"),
    (SGDMRT, {"learning_rate": 0.1, "l2": float("nan")}, "l2"),
]


@pytest.mark.parametrize(
    "cls, kwargs, name",
    INVALID,
    ids=[f"{c.__name__}-{'-'.join(map(str, kw.items()))}" for c, kw, _ in INVALID],
)
def test_invalid_argument_raises_value_error_naming_it(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        cls(**kwargs)


def test_designation_that_fits_no_variable_raises_at_build_and_an_unused_override_warns():
    with pytest.raises(ValueError, match="`spherical`.*matches no variable"):
        AdamSRT(spherical="conv").build(_variables())
    with pytest.raises(ValueError, match="`spherical`.*bool"):
        AdamSRT(spherical=lambda v: v.path).build(_variables())
    # As for AdamP: a `channel_axes` pattern that matches nothing being
    # trained (a frozen layer when fine-tuning) is ignored with a warning.
    with pytest.warns(UserWarning, match="`channel_axes`.*'conv'.*ignored"):
        AdamSRT(spherical="kernel", channel_axes={"conv": []}).build(_variables())


# -- Keras's own arguments ------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: AdamS(learning_rate=0.1, spherical="kernel", **kw),
        lambda **kw: AdamSRT(learning_rate=0.1, spherical="kernel", **kw),
        lambda **kw: SGDMRT(0.1, momentum=0.9, spherical="kernel", **kw),
    ],
    ids=["adams", "adamsrt", "sgdmrt"],
)
def test_weight_decay_is_keras_decoupled_decay(make):
    def first_step(**kw):
        variables = _variables()
        variables[0].assign(np.linspace(1, 2, 288).reshape(3, 3, 4, 8))
        optimizer = make(**kw)
        grads = [keras.ops.ones(v.shape) * 0.1 for v in variables]
        optimizer.apply_gradients(zip(grads, variables))
        return variables

    plain = first_step()
    decayed = first_step(weight_decay=0.5)
    # On the bias (not designated, l2 = 0) the step does not depend on w:
    # the decay, w * (1 - lr * weight_decay), is the whole difference.
    w0 = np.ones((8,))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(decayed[1]),
        keras.ops.convert_to_numpy(plain[1]) - 0.1 * 0.5 * w0,
        rtol=1e-6,
    )


def test_gradient_accumulation_and_ema_work_as_in_keras():
    x, y = digits(128)
    model = conv_bn_model()
    optimizer = AdamSRT(
        learning_rate=0.01,
        spherical=keras_adamp.normalized_kernels(model),
        gradient_accumulation_steps=2,
        use_ema=True,
        clipnorm=1.0,
    )
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert int(optimizer.iterations) == 4 // 2
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# -- training -----------------------------------------------------------------


def _make(name, model):
    spherical = keras_adamp.normalized_kernels(model)
    if name == "sgdmrt":
        return SGDMRT(0.05, momentum=0.9, l2=1e-4, spherical=spherical)
    cls = AdamSRT if name == "adamsrt" else AdamS
    return cls(learning_rate=0.01, l2=1e-4, spherical=spherical)


NAMES = ["adams", "adamsrt", "sgdmrt"]
# AdamS's update is AdamSRT's without the transport: the same code, slots
# and plan, so XLA and resuming are checked on AdamSRT and SGDMRT only.
TRAINED = ["adamsrt", "sgdmrt"]


def _compiled(name, jit_compile=False):
    model = conv_bn_model(0)
    model.compile(
        optimizer=_make(name, model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("name", TRAINED)
def test_jit_compile_gives_the_same_weights_as_without(name):
    x, y = digits(192)
    results = []
    for jit_compile in (False, True):
        model = _compiled(name, jit_compile)
        history = model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        assert model.jit_compile is jit_compile
        assert history.history["loss"][-1] < history.history["loss"][0]
        results.append(model.get_weights())
    assert max_relative_error(results[1], results[0]) <= 1e-5


def test_saved_models_resume_in_a_fresh_process_as_if_never_stopped(tmp_path):
    x, y = digits(128)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    fit = dict(batch_size=64, epochs=2, shuffle=False, verbose=0)
    expected = {}
    for name in TRAINED:
        model = _compiled(name)
        model.fit(x, y, **fit)
        model.save(tmp_path / f"{name}.keras")
        model.fit(x, y, **fit)  # uninterrupted, in this process
        expected[name] = model.get_weights()

    _run_python(
        f"""
        import numpy as np
        import keras
        import keras_adamp  # registers the optimizers

        data = np.load("data.npz")
        for name in {TRAINED!r}:
            model = keras.saving.load_model(name + ".keras")
            assert type(model.optimizer).__name__.lower() == name
            assert model.optimizer.spherical.startswith("(?:^|/)")
            model.fit(data["x"], data["y"], **{fit!r})
            assert int(model.optimizer.iterations) == 8
            np.savez(name + ".npz", *model.get_weights())
        """,
        cwd=tmp_path,
    )
    for name in TRAINED:
        resumed = np.load(tmp_path / f"{name}.npz")
        resumed = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
        assert max_relative_error(resumed, expected[name]) <= 1e-6, name
