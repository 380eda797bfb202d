"""Keras's own optimizer tests, run on AdamP and SGDP.

Keras 3 ships its optimizer tests in the wheel (`keras/src/optimizers/*_test.py`).
This module imports their TestCase classes and runs them, unchanged, with our
optimizers standing in for Keras's, in three variants:

- `adamp`: `AdamP(...)`;
- `sgdp_momentum`: `SGDP(momentum=0.9, ...)`;
- `sgdp_delta0`: `SGDP(delta=0, ...)`: the projection never fires
  (`|cos| < 0` is false) and without momentum it is plain SGD, so SGD's golden
  numbers apply to it.

How: Keras's tests reach their optimizer classes through module globals
(`optimizers.Adam`, `optimizers.AdamW` and `optimizers.SGD` in optimizer_test
and multi_optimizer_test, `SGD` in sgd_test and loss_scale_optimizer_test,
`AdamW` in adamw_test). For each variant a subclass of Keras's TestCase
patches those globals in `setUp` (and `optimizers.get` resolves the variant's
name); tests parameterized over Keras's optimizer names are re-parameterized
with the variant's name. `OptimizerSparseTest` runs with its table of
optimizer classes replaced by ours; since AdamP and SGDP densify a sparse
gradient (the cosine needs all of it), none of our cases expects a sparse
variable update. Keras's own skips apply (sparse: TensorFlow and JAX only;
stateless apply: not on TensorFlow; stateful loss scaling: not on JAX).

Per-optimizer files run where they belong: adamw_test with `adamp`, sgd_test
with the two SGDP variants; the cross-cutting files with all three.

Also here, the promises the reused tests showed broken (issue 11): sparse
gradients of every backend step as their dense twin (JAX `BCOO`, torch sparse
COO, TensorFlow `IndexedSlices`); default names are unique per process
(`adamp`, `adamp_1`), so a MultiOptimizer's sub-optimizers log distinct
learning rates; `weight_decay` and `exclude_from_weight_decay` set after
`build` are honoured at the next step, as by Keras's AdamW.

Excluded, with the reason and the test of the same promise that replaces it
(in this module unless a file is named):

OptimizerTest
- test_get_method (all variants): asserts what `optimizers.get("sgd")` and
  `get("adamw")` return from Keras's registry of built-in names. Replaced by
  test_get_resolves_the_registered_names.
- test_optimizer_auto_naming (all): hard-codes Keras's names (`adam`,
  `adam_1`, `adam_w`). Replaced by test_default_names_are_unique_per_process
  and test_multi_optimizer_logs_each_default_named_learning_rate.
- test_static_loss_scaling, test_overwrite_with_gradient_with_gradient_accumulation
  (adamp): SGD's golden numbers. Replaced by
  test_wrappers_leave_adamps_step_unchanged (loss_scale_factor,
  overwrite_with_gradient_and_accumulation).
- test_ema (sgdp_momentum), test_ema_with_model_fit (adamp, sgdp_momentum):
  SGD's golden numbers over several steps (test_ema passes with AdamP: its
  unit gradients make Adam's steps SGD's). Replaced by test_optimizers.py
  test_ema_keeps_the_moving_average_of_the_weights and test_fit_features.py
  test_ema_with_overwrite_in_fit.

LossScaleOptimizerTest
- test_config (adamp): builds the inner SGD with `momentum`/`nesterov`, which
  AdamP does not take. Replaced by test_serialization_round_trip_as_keras_checks_it.
- test_apply_with_no_vars, test_finite_step (stateful and stateless),
  test_finite_step_with_inner_loss_scale (both) (adamp): SGD's golden numbers.
  Replaced by test_wrappers_leave_adamps_step_unchanged (loss_scale_optimizer).

MultiOptimizerTest
- test_serialization (all): asserts the restored classes are named "Adam" and
  "SGD". Replaced by test_multi_optimizer_round_trips_adamp_and_sgdp.
- test_gradient_unscaling, test_multi_optimizer_with_model_fit (adamp): SGD's
  golden numbers. Replaced by test_wrappers_leave_adamps_step_unchanged
  (multi_optimizer); the fit path runs with the SGDP variants.

AdamWTest (adamp)
- test_config: passes `amsgrad`, which AdamP does not have. Replaced by
  test_serialization_round_trip_as_keras_checks_it.
- test_single_step: AdamW's default weight decay is 0.004, AdamP's 0 (the
  reference's). Replaced by test_adamp_single_step_with_adamws_decay_is_adamws.
- test_correctness_with_golden: Adam's golden numbers with `epsilon=2`. AdamP
  adds epsilon after the bias correction, `sqrt(v_t) / sqrt(1 - beta_2^t) +
  epsilon` (PyTorch's form, as the reference), Keras's Adam to `sqrt(v_t)` with
  the correction folded into the learning rate: first step 0.4950 against
  AdamW's 0.4998. Replaced by test_adamp_follows_the_oracle_on_adamws_golden_run
  and test_adamp_adds_epsilon_after_the_bias_correction.
- test_weight_decay_is_none: AdamW rejects `weight_decay=None`; AdamP takes it
  as no decay, as Keras's Adam does. Replaced by
  test_weight_decay_none_means_no_decay.

SGDTest
- test_correctness_with_golden (both): `SGD(nesterov=True)` without momentum,
  which SGDP, like the reference and `torch.optim.SGD`, rejects
  (test_validation.py); with momentum 0.9 the golden numbers (no momentum) do
  not apply. Replaced by test_sgdp_without_projection_is_keras_sgd.
- test_invalid_momentum (both): matches Keras's message wording. Replaced by
  test_validation.py test_invalid_hyperparameter_raises_value_error_naming_it.
- test_single_step (sgdp_momentum): counts SGD's variables without momentum;
  with momentum SGDP has a momentum slot, as Keras's SGD has (test_slots.py).
  Runs with sgdp_delta0.
- test_weight_decay (sgdp_momentum): SGDP divides the decay by `1 - momentum`,
  as the reference. Replaced by test_optimizers.py
  test_sgdp_decay_is_divided_by_one_minus_momentum; runs with sgdp_delta0.
"""

import functools
import importlib
import re
import types
from unittest import mock

import keras
import numpy as np
import pytest
from _data import apply
from _data import ignore_guessed_channels
from absl.testing import parameterized
from keras.src import optimizers as keras_optimizers
from keras.src import testing

from keras_adamp import SGDP
from keras_adamp import AdamP


def _keras_test_module(name):
    try:
        return importlib.import_module(f"keras.src.optimizers.{name}")
    except ImportError:  # a Keras without this test file
        return None


optimizer_test = _keras_test_module("optimizer_test")
optimizer_sparse_test = _keras_test_module("optimizer_sparse_test")
loss_scale_optimizer_test = _keras_test_module("loss_scale_optimizer_test")
multi_optimizer_test = _keras_test_module("multi_optimizer_test")
adamw_test = _keras_test_module("adamw_test")
sgd_test = _keras_test_module("sgd_test")

VARIANTS = {
    "adamp": functools.partial(AdamP),
    "sgdp_momentum": functools.partial(SGDP, momentum=0.9),
    "sgdp_delta0": functools.partial(SGDP, delta=0.0),
}
ALL = tuple(VARIANTS)

# (Keras module, TestCase, the globals naming its optimizers, variants run,
#  {excluded test: variants it is excluded for}), reasons in the docstring.
REUSED = [
    (
        optimizer_test,
        "OptimizerTest",
        ("Adam", "AdamW", "SGD"),
        ALL,
        {
            "test_get_method": ALL,
            "test_optimizer_auto_naming": ALL,
            "test_static_loss_scaling": ("adamp",),
            "test_overwrite_with_gradient_with_gradient_accumulation": ("adamp",),
            "test_ema": ("sgdp_momentum",),
            "test_ema_with_model_fit": ("adamp", "sgdp_momentum"),
        },
    ),
    (
        loss_scale_optimizer_test,
        "LossScaleOptimizerTest",
        ("SGD",),
        ALL,
        {
            "test_config": ("adamp",),
            "test_apply_with_no_vars": ("adamp",),
            "test_finite_step": ("adamp",),
            "test_finite_step_with_inner_loss_scale": ("adamp",),
        },
    ),
    (
        multi_optimizer_test,
        "MultiOptimizerTest",
        ("Adam", "AdamW", "SGD"),
        ALL,
        {
            "test_serialization": ALL,
            "test_gradient_unscaling": ("adamp",),
            "test_multi_optimizer_with_model_fit": ("adamp",),
        },
    ),
    (
        adamw_test,
        "AdamWTest",
        ("AdamW",),
        ("adamp",),
        {
            "test_config": ("adamp",),
            "test_single_step": ("adamp",),
            "test_correctness_with_golden": ("adamp",),
            "test_weight_decay_is_none": ("adamp",),
        },
    ),
    (
        sgd_test,
        "SGDTest",
        ("SGD",),
        ("sgdp_momentum", "sgdp_delta0"),
        {
            "test_correctness_with_golden": ("sgdp_momentum", "sgdp_delta0"),
            "test_invalid_momentum": ("sgdp_momentum", "sgdp_delta0"),
            "test_single_step": ("sgdp_momentum",),
            "test_weight_decay": ("sgdp_momentum",),
        },
    ),
]

# Keras tests parameterized over Keras's optimizer names (for `optimizers.get`):
# run once, with the variant's name.
PER_OPTIMIZER_NAME = (
    "test_gradient_accumulation_with_weigth_decay",
    "test_pickleable_optimizers",
)

SPARSE_CASES = [
    {"testcase_name": "adamp", "optimizer_class": VARIANTS["adamp"]},
    {
        "testcase_name": "adamp_nesterov",
        "optimizer_class": functools.partial(AdamP, nesterov=True),
    },
    {"testcase_name": "sgdp_momentum", "optimizer_class": VARIANTS["sgdp_momentum"]},
    {
        "testcase_name": "sgdp_momentum_nesterov",
        "optimizer_class": functools.partial(SGDP, momentum=0.9, nesterov=True),
    },
    {"testcase_name": "sgdp_delta0", "optimizer_class": VARIANTS["sgdp_delta0"]},
    {
        "testcase_name": "loss_scale_optimizer_sgdp",
        "optimizer_class": lambda: keras_optimizers.LossScaleOptimizer(
            SGDP(learning_rate=0.5, momentum=0.9)
        ),
    },
]


def _original(method):
    """The test function under an absl-parameterized one."""
    return getattr(method, "__wrapped__", method)


def _substitutes(module, names, variant):
    """{global of `module`: what it becomes} for `variant`."""
    factory = VARIANTS[variant]
    if "optimizers" not in vars(module):
        return {name: factory for name in names}

    def get(identifier):
        if identifier == variant:
            return factory()
        if isinstance(identifier, dict) and identifier["class_name"] == variant:
            return factory(**identifier["config"])
        return keras_optimizers.get(identifier)

    namespace = types.SimpleNamespace(**vars(keras_optimizers))
    for name in names:
        setattr(namespace, name, factory)
    namespace.get = get
    return {"optimizers": namespace}


def _reuse(
    module, class_name, variant, names=(), excluded=(), parameters=None, marks=()
):
    """A subclass of Keras's `module.class_name` run with `variant`
    substituted for `names`, without the `excluded` tests, with the
    parameters of the tests in `parameters` ({test: absl parameters})
    replaced, and with the pytest `marks`."""
    keras_class = getattr(module, class_name)
    patches = _substitutes(module, names, variant) if names else {}
    parameters = dict(parameters or {})
    if variant is not None:
        for name in PER_OPTIMIZER_NAME:
            parameters[name] = [(variant, variant)]

    def setUp(self):
        keras_class.setUp(self)
        for target, value in patches.items():
            patcher = mock.patch.object(module, target, value)
            patcher.start()
            self.addCleanup(patcher.stop)

    namespace = {
        "setUp": setUp,
        "__module__": __name__,
        "substituted": (module, names, variant),
        "pytestmark": list(marks),
    }
    originals = {}
    for attribute in dir(keras_class):
        if not attribute.startswith("test"):
            continue
        function = _original(getattr(keras_class, attribute))
        if function.__name__ in excluded or function.__name__ in parameters:
            namespace[attribute] = None  # not collected: not callable
            originals[function.__name__] = function
    for name, cases in parameters.items():
        if name in originals:
            namespace[name] = parameterized.named_parameters(*cases)(originals[name])
    suffix = f"_{variant}" if variant else "_keras_adamp"
    return type(keras_class)(class_name + suffix, (keras_class,), namespace)


def _reused_classes():
    classes = []
    for module, class_name, names, variants, excluded in REUSED:
        if module is None:
            continue
        for variant in variants:
            skipped = {t for t, where in excluded.items() if variant in where}
            classes.append(_reuse(module, class_name, variant, names, skipped))
    if optimizer_sparse_test is not None:
        sparse = {
            "test_sparse_gradients": SPARSE_CASES,
            "test_sparse_correctness": SPARSE_CASES,
        }
        # Keras's sparse tests step a (5, 3, 2) variable that no layer owns:
        # its output channels can only be guessed, and AdamP/SGDP's build says
        # so, once per test, as it should. Not what these tests examine.
        classes.append(
            _reuse(
                optimizer_sparse_test,
                "OptimizerSparseTest",
                None,
                parameters=sparse,
                marks=[ignore_guessed_channels],
            )
        )
    return classes


REUSED_CLASSES = _reused_classes()
for _class in REUSED_CLASSES:
    globals()[_class.__name__] = _class  # pytest collects TestCase subclasses
del _class


def test_reused_keras_tests_build_our_optimizers():
    # Were Keras to import its classes another way, the patches would miss
    # and the reused tests would silently test Keras's own optimizers.
    for reused in REUSED_CLASSES:
        module, names, variant = reused.substituted
        case = reused("setUp")
        case.setUp()
        try:
            for name in names:
                owner = getattr(module, "optimizers", module)
                built = getattr(owner, name)(learning_rate=0.1)
                expected = type(VARIANTS[variant]())
                assert type(built) is expected, (reused.__name__, name)
        finally:
            case.doCleanups()


def test_every_exclusion_names_a_keras_test_and_is_documented():
    for module, class_name, _, _, excluded in REUSED:
        if module is None:
            continue
        keras_class = getattr(module, class_name)
        tests = {
            _original(getattr(keras_class, a)).__name__
            for a in dir(keras_class)
            if a.startswith("test")
        }
        for name in excluded:
            assert name in tests, f"{class_name}.{name} is not a Keras test"
            assert re.search(rf"\b{name}\b", __doc__), f"{name}: no reason given"


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _tensor(x):
    # Keras's torch optimizers take only tensors.
    return keras.ops.convert_to_tensor(x)


# --- issue 11: sparse gradients, unique names, weight decay read at each step --

ROWS = (0, 2, 4)


def _sparse_rows(values, shape):
    """`values` at rows ROWS of a `shape` gradient, in the backend's sparse
    type: what an Embedding (TensorFlow), Keras's sparse tests (JAX) or a
    custom loop (torch's `nn.Embedding(sparse=True)`) feed."""
    backend = keras.backend.backend()
    if backend == "tensorflow":  # (a tf.SparseTensor stops in Keras's apply)
        import tensorflow as tf

        return tf.IndexedSlices(tf.constant(values), tf.constant(ROWS), shape)
    if backend == "jax":
        import jax.experimental.sparse as jax_sparse

        return jax_sparse.BCOO((values, np.array(ROWS)[:, None]), shape=shape)
    import torch

    return torch.sparse_coo_tensor(
        torch.tensor([ROWS]),
        torch.from_numpy(values),
        shape,
        check_invariants=True,
    )


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(AdamP, learning_rate=0.1, weight_decay=0.1),
        functools.partial(SGDP, learning_rate=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["adamp", "sgdp"],
)
def test_sparse_gradients_of_every_backend_step_as_dense(make):
    shape = (5, 3)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(shape).astype("float32")
    steps = [rng.standard_normal((3, 3)).astype("float32") for _ in range(3)]
    dense_variable = keras.Variable(start)
    dense_optimizer = make()
    for values in steps:
        dense = np.zeros(shape, "float32")
        dense[list(ROWS)] = values
        dense_optimizer.apply([dense], [dense_variable])
    variable = keras.Variable(start)
    optimizer = make()
    for values in steps:
        optimizer.apply([_sparse_rows(values, shape)], [variable])
    np.testing.assert_allclose(
        _numpy(variable), _numpy(dense_variable), rtol=1e-6, atol=1e-6
    )


def test_default_names_are_unique_per_process():
    keras.backend.clear_session()  # resets the name counters
    adamp, adamp_1, sgdp, sgdp_1 = AdamP(), AdamP(), SGDP(), SGDP()
    assert [o.name for o in (adamp, adamp_1, sgdp, sgdp_1)] == [
        "adamp",
        "adamp_1",
        "sgdp",
        "sgdp_1",
    ]
    assert AdamP(name="mine").name == "mine"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(adamp_1))
    assert restored.name == "adamp_1"


def test_multi_optimizer_logs_each_default_named_learning_rate(tmp_path):
    # TensorBoard (and the LR callbacks) key by `learning_rate_{name}`: two
    # sub-optimizers with the same default name would overwrite each other.
    keras.backend.clear_session()
    first, second = AdamP(learning_rate=0.1), AdamP(learning_rate=0.01)
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(2, name="dense_1"),
            keras.layers.Dense(1, name="dense_2"),
        ]
    )
    model.compile(
        loss="mse",
        optimizer=keras_optimizers.MultiOptimizer(
            keras_optimizers.OptimizerMap(
                default_optimizer=second, optimizer_map={".*dense_1/.*": first}
            )
        ),
    )
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    board.set_model(model)
    logs = board._collect_learning_rate({})
    assert logs["learning_rate_adamp"] == pytest.approx(0.1)
    assert logs["learning_rate_adamp_1"] == pytest.approx(0.01)


# Keras's AdamW first: the behaviour promised; rank-1 variables and zero
# gradients, so the step is the decay alone (ratio 1, SGDP without momentum).
DECAYING = [
    keras.optimizers.AdamW,
    AdamP,
    SGDP,
]


@pytest.mark.parametrize("make", DECAYING, ids=lambda c: c.__name__)
def test_weight_decay_set_after_build_is_honoured(make):
    variable = keras.Variable([2.0])
    zero = _tensor(np.zeros(1, "float32"))
    optimizer = make(learning_rate=1.0, weight_decay=0.0)
    optimizer.apply([zero], [variable])
    np.testing.assert_allclose(_numpy(variable), [2.0])
    optimizer.weight_decay = 0.5
    optimizer.apply([zero], [variable])
    np.testing.assert_allclose(_numpy(variable), [1.0])


@pytest.mark.parametrize("make", DECAYING, ids=lambda c: c.__name__)
def test_exclusion_set_after_build_is_honoured(make):
    kept = keras.Variable([2.0], name="kept")
    excluded = keras.Variable([2.0], name="exclude")
    zero = _tensor(np.zeros(1, "float32"))
    optimizer = make(learning_rate=1.0, weight_decay=0.5)
    optimizer.apply([zero, zero], [kept, excluded])
    optimizer.exclude_from_weight_decay(var_names=["exclude"])
    optimizer.apply([zero, zero], [kept, excluded])
    np.testing.assert_allclose(_numpy(kept), [0.5])
    np.testing.assert_allclose(_numpy(excluded), [1.0])


# --- replacements: the promises of the excluded tests, for AdamP and SGDP ------


def _keras_checks():
    """A Keras TestCase to call its helpers (`run_class_serialization_test`)."""
    return testing.TestCase()


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: AdamP(
            learning_rate=0.5,
            weight_decay=0.008,
            beta_1=0.5,
            beta_2=0.67,
            epsilon=1e-5,
            nesterov=True,
            delta=0.2,
            wd_ratio=0.3,
            channel_axes={"conv": -1},
        ),
        lambda: SGDP(
            learning_rate=0.5,
            momentum=0.06,
            nesterov=True,
            weight_decay=0.004,
            delta=0.2,
        ),
    ],
    ids=["adamp", "sgdp"],
)
def test_serialization_round_trip_as_keras_checks_it(optimizer):
    checks = _keras_checks()
    checks.run_class_serialization_test(optimizer())
    checks.run_class_serialization_test(
        keras_optimizers.LossScaleOptimizer(optimizer())
    )


def test_get_resolves_the_registered_names():
    assert isinstance(keras.optimizers.get("keras_adamp>AdamP"), AdamP)
    sgdp = keras.optimizers.get(
        {"class_name": "keras_adamp>SGDP", "config": {"momentum": 0.9}}
    )
    assert isinstance(sgdp, SGDP) and sgdp.momentum == 0.9


def test_multi_optimizer_round_trips_adamp_and_sgdp():
    with keras.name_scope("dense_1"):
        w1 = keras.Variable([[1.0]], name="kernel")
    w2 = keras.Variable([[1.0]], name="kernel")
    multi = keras_optimizers.MultiOptimizer(
        keras_optimizers.OptimizerMap(
            default_optimizer=SGDP(momentum=0.9),
            optimizer_map={"^dense_1/.*": AdamP(weight_decay=0.1)},
        )
    )
    multi.build([w1, w2])
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(multi))
    restored.build([w1, w2])
    assert [type(o) for o in restored.optimizers] == [AdamP, SGDP]
    assert restored.optimizers[0].get_config() == multi.optimizers[0].get_config()
    assert restored.optimizers[1].momentum == 0.9


def test_weight_decay_none_means_no_decay():
    variable = keras.Variable([2.0, 3.0])
    optimizer = AdamP(learning_rate=1.0, weight_decay=None)
    assert optimizer.weight_decay == 0.0
    optimizer.apply([keras.ops.zeros((2,))], [variable])
    np.testing.assert_array_equal(_numpy(variable), [2.0, 3.0])


def test_adamp_single_step_with_adamws_decay_is_adamws():
    # AdamW's single-step promise with AdamW's default decay passed explicitly.
    gradient = np.array([1.0, 6.0, 7.0, 2.0], "float32")
    ours, theirs = (keras.Variable([1.0, 2.0, 3.0, 4.0]) for _ in range(2))
    AdamP(learning_rate=0.5, weight_decay=0.004).apply([gradient], [ours])
    keras.optimizers.AdamW(learning_rate=0.5).apply([_tensor(gradient)], [theirs])
    np.testing.assert_allclose(_numpy(ours), _numpy(theirs), rtol=1e-4, atol=1e-4)


def _golden_run_gradients():
    """The gradients of Keras's golden runs: 0.01 everywhere, then five steps
    of 0.1, 0.2, ..., 1.0."""
    first = np.full((10,), 0.01, "float32")
    return [first] + [np.arange(1, 11, dtype="float32") / 10] * 5


def test_adamp_follows_the_oracle_on_adamws_golden_run(oracle):
    torch, adamp = oracle
    variable = keras.Variable(np.ones(10, "float32"))
    param = torch.nn.Parameter(torch.ones(10))
    ours = AdamP(learning_rate=1.0, weight_decay=0.5, epsilon=2.0)
    reference = adamp.AdamP([param], lr=1.0, weight_decay=0.5, eps=2.0)
    for gradient in _golden_run_gradients():
        ours.apply([gradient], [variable])
        param.grad = torch.from_numpy(gradient.copy())
        reference.step()
        np.testing.assert_allclose(
            _numpy(variable), param.detach().numpy(), rtol=1e-5, atol=1e-6
        )


def test_adamp_adds_epsilon_after_the_bias_correction():
    # First step, lr=1, beta_2=0.999, g=0.01, epsilon=2 (AdamW's golden run):
    # m_hat = g and sqrt(v_hat) = |g|, and AdamP divides by |g| + epsilon;
    # Keras's Adam divides m_t = 0.1 g by sqrt(v_t) + epsilon, then scales
    # by sqrt(1 - beta_2) / (1 - beta_1).
    g, eps, lr = 0.01, 2.0, 1.0
    pytorch_form = 1.0 - lr * g / (g + eps)
    keras_form = 1.0 - lr * (0.001**0.5 / 0.1) * (0.1 * g) / (
        (0.001 * g * g) ** 0.5 + eps
    )
    ours, theirs = (keras.Variable(np.ones(3, "float32")) for _ in range(2))
    gradient = np.full((3,), g, "float32")
    AdamP(learning_rate=lr, epsilon=eps).apply([gradient], [ours])
    keras.optimizers.Adam(learning_rate=lr, epsilon=eps).apply(
        [_tensor(gradient)], [theirs]
    )
    np.testing.assert_allclose(_numpy(ours), pytorch_form, rtol=1e-6)
    np.testing.assert_allclose(_numpy(theirs), keras_form, rtol=1e-6)
    assert abs(pytorch_form - keras_form) > 4e-3  # 0.99502 vs 0.99984


@pytest.mark.parametrize(
    "momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)]
)
@pytest.mark.parametrize("shape", [(10,), (5, 2)])
def test_sgdp_without_projection_is_keras_sgd(momentum, nesterov, shape):
    # Rank 1 is never projected; at rank 2, delta=0 switches the projection
    # off. SGD's golden run (its gradients, lr=0.01) then equals Keras's SGD.
    ours, theirs = (keras.Variable(np.ones(shape, "float32")) for _ in range(2))
    sgdp = SGDP(momentum=momentum, nesterov=nesterov, delta=0.0)
    sgd = keras.optimizers.SGD(momentum=momentum, nesterov=nesterov)
    for gradient in _golden_run_gradients():
        gradient = gradient.reshape(shape)
        sgdp.apply([gradient], [ours])
        sgd.apply([_tensor(gradient)], [theirs])
        np.testing.assert_allclose(_numpy(ours), _numpy(theirs), rtol=1e-6)


# --- replacements for the wrappers tested with SGD's golden numbers ------------


def _kernels():
    with keras.name_scope("dense_1"):
        w1 = keras.Variable([[2.0, 1.0], [0.5, 3.0]], name="kernel")
    with keras.name_scope("dense_2"):
        w2 = keras.Variable([[3.0, -1.0], [1.0, 1.0]], name="kernel")
    return w1, w2


GRADIENTS = [
    np.array([[1.0, 2.0], [3.0, 4.0]], "float32"),
    np.array([[-0.5, 1.0], [2.0, 0.25]], "float32"),
]


@pytest.mark.parametrize(
    "wrapper",
    [
        "loss_scale_factor",
        "loss_scale_optimizer",
        "multi_optimizer",
        "overwrite_with_gradient_and_accumulation",
    ],
)
def test_wrappers_leave_adamps_step_unchanged(wrapper):
    keras.backend.clear_session()
    w1, w2 = _kernels()
    r1, r2 = _kernels()  # same paths, so the same channel layouts
    plain_1, plain_2 = AdamP(learning_rate=0.1), AdamP(learning_rate=1.0)
    for g1, g2 in zip(GRADIENTS, GRADIENTS[::-1]):
        plain_1.apply([g1], [r1])
        plain_2.apply([g2], [r2])
    expected_2 = _numpy(r2)
    if wrapper == "loss_scale_factor":
        optimizer = AdamP(learning_rate=0.1, loss_scale_factor=1024.0)
        steps = [([g * 1024.0], [w1]) for g in GRADIENTS]
    elif wrapper == "loss_scale_optimizer":
        optimizer = keras_optimizers.LossScaleOptimizer(
            AdamP(learning_rate=0.1, loss_scale_factor=100.0),
            initial_scale=64.0,
        )
        steps = [([g * 64.0], [w1]) for g in GRADIENTS]
    elif wrapper == "multi_optimizer":
        optimizer = keras_optimizers.MultiOptimizer(
            keras_optimizers.OptimizerMap(
                default_optimizer=AdamP(learning_rate=1.0),
                optimizer_map={"^dense_1/.*": AdamP(learning_rate=0.1)},
            ),
            loss_scale_factor=5.0,
        )
        steps = [
            ([g1 * 5.0, g2 * 5.0], [w1, w2])
            for g1, g2 in zip(GRADIENTS, GRADIENTS[::-1])
        ]
    else:
        # w1 steps once, on the mean of the two accumulated gradients; w2
        # takes the largest of its accumulated gradients as its value.
        w2.overwrite_with_gradient = True
        optimizer = AdamP(learning_rate=0.1, gradient_accumulation_steps=2)
        steps = [([g, np.abs(g)], [w1, w2]) for g in GRADIENTS]
        r1.assign(w1.value)
        AdamP(learning_rate=0.1).apply([sum(GRADIENTS) / 2], [r1])
        expected_2 = np.maximum(*np.abs(GRADIENTS))
    for gradients, variables in steps:
        apply(optimizer, gradients, variables)
    np.testing.assert_allclose(_numpy(w1), _numpy(r1), rtol=1e-6, atol=1e-6)
    if wrapper in ("multi_optimizer", "overwrite_with_gradient_and_accumulation"):
        np.testing.assert_allclose(_numpy(w2), expected_2, rtol=1e-6, atol=1e-6)
