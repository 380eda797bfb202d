"""The step the five optimizers share (keras_adamp/_base.py): one base, the
decisions of all variables in one call, and nothing assigned before it."""

import keras
import numpy as np
import pytest
from _data import ignore_guessed_channels

import keras_adamp
from keras_adamp import _base
from keras_adamp import projection

pytestmark = ignore_guessed_channels


@pytest.fixture(autouse=True)
def keras_ops_path(monkeypatch):
    """These tests are of the keras.ops step; on torch the torch-native
    executor (tested in test_torch_executor.py) would take it over."""
    if keras.backend.backend() == "torch":
        from keras_adamp import _torch

        monkeypatch.setattr(_torch, "ENABLED", False)


@pytest.fixture
def coefficient_calls(monkeypatch):
    """The number of layouts of each call of `projection.coefficients` (one
    call per decision) in the test, in order."""
    calls = []
    original = projection.coefficients

    def counted(layouts, sums, *args):
        calls.append(len(layouts))
        return original(layouts, sums, *args)

    monkeypatch.setattr(projection, "coefficients", counted)
    return calls


def variables():
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 2, 4), (4,), (6, 5), (5,), (5, 3)]
    return [
        keras.Variable(rng.normal(size=s).astype("float32"), name=f"v{i}")
        for i, s in enumerate(shapes)
    ], [rng.normal(size=s).astype("float32") for s in shapes]


OPTIMIZERS = {
    "adamp": lambda: keras_adamp.AdamP(weight_decay=0.1),
    "sgdp": lambda: keras_adamp.SGDP(momentum=0.9, weight_decay=0.1),
    "sgdp_nesterov": lambda: keras_adamp.SGDP(momentum=0.9, nesterov=True),
    "adamsrt": lambda: keras_adamp.AdamSRT(spherical=lambda v: len(v.shape) > 1),
    "sgdmrt": lambda: keras_adamp.SGDMRT(
        0.1, momentum=0.9, spherical=lambda v: len(v.shape) > 1
    ),
}


def test_all_five_optimizers_share_one_step_base():
    for cls in (
        keras_adamp.AdamP,
        keras_adamp.SGDP,
        keras_adamp.AdamS,
        keras_adamp.AdamSRT,
        keras_adamp.SGDMRT,
    ):
        assert issubclass(cls, _base.StepOptimizer)
        # one definition of the step and of the densification, not copies
        assert cls._backend_update_step is _base.StepOptimizer._backend_update_step
        assert cls._dense is _base.StepOptimizer._dense


@pytest.mark.parametrize("name", ["adamp", "sgdp", "sgdp_nesterov"])
def test_one_decision_for_all_projected_variables(name, coefficient_calls):
    vs, gs = variables()
    optimizer = OPTIMIZERS[name]()
    optimizer.apply(gs, vs)
    assert coefficient_calls == [3]  # the three variables of rank > 1, in one call


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_sums_and_the_decision_assign_nothing(name):
    vs, gs = variables()
    optimizer = OPTIMIZERS[name]()
    optimizer.build(vs)
    optimizer.apply(gs, vs)  # slots not all zero
    state = [keras.ops.convert_to_numpy(v) for v in vs + optimizer.variables]
    entries = optimizer._decide(gs, vs, optimizer.learning_rate)
    after = [keras.ops.convert_to_numpy(v) for v in vs + optimizer.variables]
    for a, b in zip(state, after):
        np.testing.assert_array_equal(a, b)
    # ... and the update computed afterwards from that state is the step's
    optimizer._run_step(gs, vs, optimizer.learning_rate)
    reference = OPTIMIZERS[name]()
    rvs, _ = variables()
    reference.build(rvs)
    reference.apply(gs, rvs)
    reference.apply(gs, rvs)
    for a, b in zip(vs, rvs):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6
        )
    assert len(entries) == len(vs)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution")
def test_variables_sharded_by_a_distribution_decide_alone(coefficient_calls):
    import jax

    mesh = keras.distribution.DeviceMesh((1,), ["model"], jax.devices()[:1])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["v2"] = (None, "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    try:
        vs, gs = variables()
        optimizer = OPTIMIZERS["adamp"]()
        optimizer.apply(gs, vs)
    finally:
        keras.distribution.set_distribution(previous)
    # v0 and v4 (replicated) together, v2 (sharded) alone
    assert sorted(coefficient_calls) == [1, 2]


def test_each_optimizer_names_its_torch_step():
    names = {
        keras_adamp.AdamP(): "adamp",
        keras_adamp.SGDP(): "sgdp",
        keras_adamp.AdamS(spherical=[]): "adams",
        keras_adamp.AdamSRT(spherical=[]): "adams",  # AdamS's, with transport
        keras_adamp.SGDMRT(0.1, spherical=[]): "sgdmrt",
    }
    for optimizer, name in names.items():
        assert optimizer._torch_step_name() == name, type(optimizer).__name__
    if keras.backend.backend() == "torch":
        from keras_adamp import _torch

        assert set(names.values()) == set(_torch.STEPS)


def test_a_subclass_keeps_the_torch_step_unless_it_redefines_the_step():
    class Renamed(keras_adamp.AdamP):
        def __init__(self, **kwargs):
            super().__init__(learning_rate=0.5, **kwargs)

    class OwnAssign(keras_adamp.SGDP):
        def _assign(self, *args):
            super()._assign(*args)

    class OwnUpdateStep(keras_adamp.AdamSRT):
        def update_step(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)

    assert Renamed()._torch_step_name() == "adamp"
    assert OwnAssign()._torch_step_name() is None
    assert OwnUpdateStep(spherical=[])._torch_step_name() is None


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_subclass_that_overrides_update_step_has_it_called(name):
    # Keras's per-variable loop runs the subclass's update_step (on torch:
    # the generic path, not the torch executor).
    base = type(OPTIMIZERS[name]())
    calls = []

    class Overriding(base):
        def update_step(self, gradient, variable, learning_rate):
            calls.append(tuple(variable.shape))
            super().update_step(gradient, variable, learning_rate)

    vs, gs = variables()
    built = OPTIMIZERS[name]()
    built.build(vs)  # its config then names the designated variables
    optimizer = Overriding.from_config(built.get_config())
    ref_vs, _ = variables()
    reference = OPTIMIZERS[name]()
    for _ in range(2):
        optimizer.apply(gs, vs)
        reference.apply(gs, ref_vs)
    assert calls == [tuple(v.shape) for v in vs] * 2
    for a, b in zip(vs, ref_vs):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6
        )
