"""The torch-native step (keras_adamp/_torch.py) against the generic
keras.ops path, on the torch backend.

Each optimizer takes a few steps on a mixed set of variables (conv, dense
and embedding kernels, biases, 16-bit kernels, variables with no elements,
kernels larger than the CPU sums' row blocks, in every layout the sums
handle) twice, once through the executor and once through the generic path,
from the same weights and gradients; variables and slots must agree. The
gradients are built at each step from the current weights so that every
branch of AdamP/SGDP's decision is taken (channel-wise, layer-wise, not
projected), with weight decay on, one variable excluded from it, and sparse
(torch COO) gradients for the embedding. Oracle parity through the executor
is tests/test_oracle_parity.py and test_spherical_parity.py, which take this
path on torch.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import _torch

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="the torch executor runs on torch"
)

STEPS = 3

# name, shape, dtype; what its gradient is made to be (see `_gradient`).
VARIABLES = [
    ("conv/kernel", (3, 3, 4, 8), "float32", "channel"),  # (36, 8) view
    ("dense/kernel", (16, 6), "float32", "layer"),
    ("dense2/kernel", (10, 5), "float32", "none"),  # excluded from decay
    ("embedding/embeddings", (20, 4), "float32", "sparse"),  # rows: (C, R)
    ("conv/bias", (8,), "float32", "none"),
    ("norm/gamma", (6,), "float32", "none"),
    ("half/kernel", (3, 3, 2, 4), "float16", "channel16"),
    ("brain/kernel", (6, 4), "bfloat16", "layer"),
    ("big/kernel", (52, 30), "float32", "channel"),  # row blocks of (R, C)
    ("bigrows/embeddings", (30, 52), "float32", "channel"),  # of (C, R)
    ("whole/kernel", (40, 40), "float32", "layer"),  # one group: dots
    ("mha/kernel", (6, 5, 4), "float32", "channel"),  # axes (0, 2): 3-D view
    ("empty/kernel", (0, 3), "float32", "none"),
    ("empty/bias", (0,), "float32", "none"),
]
CHANNEL_AXES = {"whole/kernel": [], "mha/kernel": [0, 2]}


def _variables():
    rng = np.random.default_rng(0)
    out = []
    for path, shape, dtype, kind in VARIABLES:
        scope, name = path.split("/")
        with keras.name_scope(scope):
            value = rng.normal(size=shape).astype("float32")
            if name in ("gamma",):
                value = 1.0 + 0.1 * value
            if kind == "channel16":
                value = np.sign(value)
            out.append(keras.Variable(value, dtype=dtype, name=name))
    return out


def _channel_view(w, path):
    """w (numpy) as (channels, elements per channel) for its layout."""
    axes = CHANNEL_AXES.get(path)
    if axes is None:
        axes = keras_adamp.layouts.default_channel_axes(w.shape, path.split("/")[-1])
    axes = [a % w.ndim for a in axes]
    rest = [a for a in range(w.ndim) if a not in axes]
    w = np.transpose(w, axes + rest)
    channels = int(np.prod([w.shape[i] for i in range(len(axes))]))
    return w.reshape(channels, -1)


def _gradient(kind, w, path, rng):
    """A gradient for the weights `w` that makes AdamP/SGDP's test pass per
    channel (`channel`: each channel's gradient orthogonal to its weights),
    only for the whole tensor (`layer`: each channel's gradient along its
    weights, the whole orthogonal), or not at all."""
    w64 = w.astype("float64")
    noise = rng.normal(size=w.shape)
    scale = 0.1
    if kind == "channel16":
        # float16: every element of g far from 0, so that Adam's second
        # moment (0.001 g^2 at the first step) does not underflow; with
        # weights near +-1, a +-1 pattern is nearly orthogonal per channel
        # already and the projection below changes it little.
        wc = _channel_view(w64, path)
        pattern = np.where(np.arange(wc.shape[1]) % 2 == 0, 1.0, -1.0)
        noise = _unview(np.sign(wc) * pattern, w.shape, path)
        kind, scale = "channel", 1.0
    if kind == "channel":
        wc, nc = _channel_view(w64, path), _channel_view(noise, path)
        nc = nc - wc * (
            np.sum(nc * wc, 1, keepdims=True) / np.sum(wc * wc, 1, keepdims=True)
        )
        g = _unview(nc, w.shape, path)
    elif kind == "layer":
        wc = _channel_view(w64, path)
        if wc.shape[0] == 1:  # one group: orthogonal to the whole
            flat = noise.reshape(-1)
            flat = flat - w64.reshape(-1) * (flat @ w64.reshape(-1)) / (
                w64.reshape(-1) @ w64.reshape(-1)
            )
            g = flat.reshape(w.shape)
        else:
            norms = np.sum(wc * wc, 1, keepdims=True)
            signs = np.where(np.arange(wc.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
            factor = signs / norms
            factor[-1] -= np.sum(factor[:, 0] * norms[:, 0]) / norms[-1, 0]
            g = _unview(wc * factor, w.shape, path)
    else:
        g = noise + w64
    return (scale * g).astype("float32")


def _unview(x, shape, path):
    axes = CHANNEL_AXES.get(path)
    if axes is None:
        axes = keras_adamp.layouts.default_channel_axes(shape, path.split("/")[-1])
    ndim = len(shape)
    axes = [a % ndim for a in axes]
    rest = [a for a in range(ndim) if a not in axes]
    order = axes + rest
    x = x.reshape([shape[a] for a in order])
    return np.transpose(x, np.argsort(order))


def _sparse(g):
    """A torch sparse COO gradient equal to `g`, with repeated rows."""
    import torch

    rows = np.nonzero(np.any(g != 0, axis=1))[0]
    # each row split in two halves sent as two entries of the same index
    indices = np.concatenate([rows, rows])
    values = np.concatenate([0.25 * g[rows], 0.75 * g[rows]])
    return torch.sparse_coo_tensor(
        torch.tensor(indices[None, :]),
        torch.tensor(values),
        g.shape,
        check_invariants=True,
    )


OPTIMIZERS = {
    "adamp": lambda: keras_adamp.AdamP(0.01, weight_decay=0.1),
    "adamp_nesterov": lambda: keras_adamp.AdamP(0.01, weight_decay=0.1, nesterov=True),
    "sgdp": lambda: keras_adamp.SGDP(0.05, dampening=0.1, weight_decay=0.1),
    "sgdp_momentum": lambda: keras_adamp.SGDP(
        0.05, momentum=0.9, dampening=0.1, weight_decay=0.1
    ),
    "sgdp_nesterov": lambda: keras_adamp.SGDP(
        0.05, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "adams": lambda: keras_adamp.AdamS(0.01, l2=0.01, weight_decay=0.05),
    "adamsrt": lambda: keras_adamp.AdamSRT(0.01, l2=0.01, weight_decay=0.05),
    "sgdmrt": lambda: keras_adamp.SGDMRT(0.05, l2=0.01, weight_decay=0.05),
    "sgdmrt_momentum": lambda: keras_adamp.SGDMRT(
        0.05, momentum=0.9, dampening=0.1, l2=0.01, weight_decay=0.05
    ),
}
SPHERICAL = ("adams", "adamsrt", "sgdmrt", "sgdmrt_momentum")


def _make(name, variables):
    optimizer = OPTIMIZERS[name]()
    optimizer.channel_axes = keras_adamp.layouts.validate_channel_axes(CHANNEL_AXES)
    if name in SPHERICAL:
        # every kernel and the gamma designated; a bias not
        optimizer.spherical = tuple(
            v for v, (path, *_) in zip(variables, VARIABLES) if "bias" not in path
        )
    optimizer.exclude_from_weight_decay(var_list=[variables[2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.build(variables)
    return optimizer


def _gradients(variables, rng):
    """This step's gradients, from the current weights (so that every step
    takes the branch each variable is made for)."""
    grads = []
    for v, (path, _, _, kind) in zip(variables, VARIABLES):
        w = np.asarray(v.numpy(), "float32")
        g = _gradient("channel" if kind == "sparse" else kind, w, path, rng)
        if kind == "sparse":
            g = _sparse(g)
        elif path == "conv/kernel":
            g = np.asfortranarray(g)  # a non-contiguous tensor's strides
        else:
            g = g.astype(v.dtype)
        grads.append(g)
    return grads


def _run(name, enabled, monkeypatch):
    monkeypatch.setattr(_torch, "ENABLED", enabled)
    # Row blocks of 256 elements: the blocked CPU sums, with a last block
    # shorter than the others, on variables this small.
    monkeypatch.setattr(_torch, "_BLOCK", 256)
    rng = np.random.default_rng(1)
    variables = _variables()
    optimizer = _make(name, variables)
    taken = []
    update = _torch.update

    def recorded(*args):
        taken.append(update(*args))
        return taken[-1]

    monkeypatch.setattr(_torch, "update", recorded)
    for _ in range(STEPS):
        grads = _gradients(variables, rng)
        if enabled:
            optimizer.apply(grads, variables)
        else:
            # The generic path can't take variables with no elements before
            # issue 18 (their layouts); they have nothing to update.
            pairs = [(g, v) for g, v in zip(grads, variables) if np.prod(v.shape)]
            optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
    # The executor took every step (it declines only where it must).
    assert taken == [enabled] * STEPS
    return [np.asarray(v.numpy(), "float32") for v in variables], [
        np.asarray(s.numpy()) for s in optimizer.variables
    ]


def _cosines(w, g, path):
    """max_c |cos(g_c, w_c)| and |cos(g, w)|."""
    wc, gc = (
        _channel_view(w.astype("float64"), path),
        _channel_view(g.astype("float64"), path),
    )
    per = np.abs(np.sum(wc * gc, 1)) / (
        np.linalg.norm(wc, axis=1) * np.linalg.norm(gc, axis=1)
    )
    whole = abs(np.sum(wc * gc)) / (np.linalg.norm(wc) * np.linalg.norm(gc))
    return per.max(), whole, wc.shape[1], wc.size


def test_the_gradients_take_every_branch_of_the_decision():
    variables = _variables()
    grads = _gradients(variables, np.random.default_rng(1))
    seen = set()
    for v, g, (path, shape, _, kind) in zip(variables, grads, VARIABLES):
        if len(shape) < 2 or not np.prod(shape) or "bias" in path:
            continue
        g = g.to_dense().numpy() if kind == "sparse" else np.asarray(g, "float32")
        channel, whole, group, numel = _cosines(
            np.asarray(v.numpy(), "float32"), g, path
        )
        channel_wise = channel < 0.1 / np.sqrt(group)
        layer_wise = whole < 0.1 / np.sqrt(numel)
        if kind in ("channel", "channel16", "sparse"):
            assert channel_wise, path
        elif kind == "layer":
            assert layer_wise and (not channel_wise or group == numel), path
        else:
            assert not channel_wise and not layer_wise, path
        seen.add(kind)
    assert seen == {"channel", "channel16", "layer", "none", "sparse"}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_executor_steps_as_the_generic_path(name, monkeypatch):
    fast, fast_slots = _run(name, True, monkeypatch)
    slow, slow_slots = _run(name, False, monkeypatch)
    for (path, shape, dtype, _), a, b in zip(VARIABLES, fast, slow):
        assert a.shape == shape
        tol = 1e-5 if dtype == "float32" else 2e-2
        scale = max(np.max(np.abs(b), initial=0.0), 1e-30)
        assert np.max(np.abs(a - b), initial=0.0) <= tol * scale, path
    assert len(fast_slots) == len(slow_slots)
    for k, (a, b) in enumerate(zip(fast_slots, slow_slots)):
        # A transported moment can be the rounding noise of a cancellation
        # (a radial gradient's tangent part): compared at the gradients'
        # scale (0.1) at least.
        tol = 2e-2 if np.prod(a.shape) and a.dtype != np.float32 else 1e-5
        scale = max(np.max(np.abs(b), initial=0.0), 0.1)
        assert np.max(np.abs(a - b), initial=0.0) <= tol * scale, k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_zero_learning_rate_leaves_every_weight_as_it_is(name, monkeypatch):
    # A schedule that reaches 0: the step size multiplies each update, it is
    # not folded into a denominator (0 * inf).
    monkeypatch.setattr(_torch, "_BLOCK", 256)
    variables = _variables()
    before = [np.asarray(v.numpy(), "float32") for v in variables]
    optimizer = _make(name, variables)
    optimizer.learning_rate = 0.0
    rng = np.random.default_rng(2)
    for _ in range(2):
        optimizer.apply(_gradients(variables, rng), variables)
    for (path, *_), v, w in zip(VARIABLES, variables, before):
        np.testing.assert_array_equal(np.asarray(v.numpy(), "float32"), w, path)


def test_stateless_apply_takes_the_generic_path(monkeypatch):
    # In a StatelessScope no variable may change, even where the tensors the
    # scope maps the variables to are their own parameters (`.value`): the
    # executor declines. tests/test_stateless.py checks the results.
    taken = []
    update = _torch.update
    monkeypatch.setattr(
        _torch, "update", lambda *a: taken.append(update(*a)) or taken[-1]
    )
    v = keras.Variable(np.ones((4, 3), "float32"), name="kernel")
    optimizer = keras_adamp.AdamP(0.1)
    optimizer.build([v])
    state = [x.value for x in optimizer.variables]
    grad = np.full((4, 3), 0.5, "float32")
    (new,), _ = optimizer.stateless_apply(state, [grad], [v.value])
    assert taken == [False]
    np.testing.assert_array_equal(v.numpy(), np.ones((4, 3)))
    assert np.all(np.asarray(keras.ops.convert_to_numpy(new)) < 1.0)
    # Outside the scope it takes the step.
    optimizer.apply([grad], [v])
    assert taken == [False, True]


def test_a_subclass_takes_the_executor_unless_it_overrides_the_step(monkeypatch):
    taken, called = [], []
    update = _torch.update
    monkeypatch.setattr(
        _torch, "update", lambda *a: taken.append(update(*a)) or taken[-1]
    )

    class Renamed(keras_adamp.SGDP):
        def __init__(self):
            super().__init__(0.1, momentum=0.9, weight_decay=0.1)

    class Overriding(Renamed):
        def update_step(self, gradient, variable, learning_rate):
            called.append(variable.path)
            super().update_step(gradient, variable, learning_rate)

    variables = _variables()
    grads = _gradients(variables, np.random.default_rng(1))
    results = []
    for cls in (Renamed, Overriding):
        vs = _variables()
        cls().apply(grads, vs)
        results.append([np.asarray(v.numpy(), "float32") for v in vs])
    # Renamed: the executor; Overriding: its update_step, per variable.
    assert taken == [True]
    assert called == [v.path for v in variables]
    for (path, _, dtype, _), a, b in zip(VARIABLES, *results):
        tol = 1e-5 if dtype == "float32" else 2e-2
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=path)
