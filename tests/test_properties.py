"""Property-based tests (hypothesis) of the projection and of the steps built
on it, in keras.ops: they run on every backend.

The variables are drawn as (shape, seed, weight scale, how far the gradient
leans towards the weight); a gradient leaning less than the threshold forces
the projection, more than it forbids it, and the draws in between exercise
both.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_adamp import SGDP
from keras_adamp import AdamP
from keras_adamp import projection

DELTA = 0.1
EPS = 1e-8
SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # reproducible in CI
    suppress_health_check=[HealthCheck.too_slow],
)

# (rows, channels): a Dense kernel, grouped by its last axis.
shapes = st.tuples(st.integers(2, 12), st.integers(1, 5))
cases = st.fixed_dictionaries(
    {
        "shape": shapes,
        "seed": st.integers(0, 2**31 - 1),
        # ||w|| >> eps: the reference divides by (||w|| + eps)^2, which leaves
        # a radial part of ~2 eps / ||w|| by design
        "scale": st.sampled_from([0.1, 1.0, 1e2]),
        # |cos(g, w)| per channel as a fraction of delta / sqrt(group size)
        "lean": st.floats(0.0, 3.0),
        "per_channel": st.booleans(),
    }
)


def draw(case):
    """(w, g) in float32 where g leans `lean` thresholds towards w, per channel
    (or on the whole tensor)."""
    rng = np.random.default_rng(case["seed"])
    rows, channels = case["shape"]
    w = rng.standard_normal((rows, channels)) * case["scale"]
    r = rng.standard_normal((rows, channels))
    if case["per_channel"]:
        n, axis = rows, 0
    else:
        n, axis = rows * channels, None
    w_hat = w / np.linalg.norm(w, axis=axis, keepdims=True)
    # orthogonal part of unit norm, then a radial part giving the wanted cosine
    o = r - w_hat * (r * w_hat).sum(axis=axis, keepdims=True)
    o = o / np.linalg.norm(o, axis=axis, keepdims=True)
    cos = min(case["lean"] * DELTA / math.sqrt(n), 0.99)
    g = o * math.sqrt(1 - cos**2) + w_hat * cos
    return w.astype("float32"), g.astype("float32")


def layout_of(w):
    return projection.ChannelLayout.create(w.shape, -1)


def project(w, g, u):
    u_new, ratio = projection.project(
        keras.ops.convert_to_tensor(w),
        keras.ops.convert_to_tensor(g),
        keras.ops.convert_to_tensor(u),
        layout_of(w),
        DELTA,
        0.1,
        EPS,
    )
    return keras.ops.convert_to_numpy(u_new), float(ratio)


def decision(w, g):
    return int(projection.scale_invariance(w, g, layout_of(w), DELTA, EPS))


def groups(x, kind):
    """The groups of the view that was projected: columns, or the whole."""
    if kind == projection.CHANNEL_WISE:
        return [x[:, c] for c in range(x.shape[1])]
    return [x.ravel()]


@SETTINGS
@given(cases)
def test_projected_update_is_orthogonal_to_w_per_group(case):
    w, g = draw(case)
    u = np.random.default_rng(case["seed"] + 1).standard_normal(w.shape)
    u = u.astype("float32")
    kind = decision(w, g)
    u_new, ratio = project(w, g, u)
    if kind == projection.NOT_PROJECTED:
        np.testing.assert_array_equal(u_new, u)
        assert ratio == 1.0
        return
    assert ratio == pytest.approx(0.1)
    # |<u_c, w_c>| <= 1e-5 |u_c| |w_c|, |u_c| the update's norm before the
    # projection: when u is nearly radial, float32 rounding of the removed
    # radial part leaves ~1e-7 |u_c| behind, whatever the result's norm.
    for u_c, u0_c, w_c in zip(groups(u_new, kind), groups(u, kind), groups(w, kind)):
        dot = abs(float(np.dot(u_c.astype("float64"), w_c)))
        assert dot <= 1e-5 * np.linalg.norm(u0_c) * np.linalg.norm(w_c)


@SETTINGS
@given(cases)
def test_projecting_twice_changes_nothing(case):
    w, g = draw(case)
    u = np.random.default_rng(case["seed"] + 2).standard_normal(w.shape)
    once, _ = project(w, g, u.astype("float32"))
    twice, _ = project(w, g, once)
    np.testing.assert_allclose(twice, once, rtol=0, atol=1e-6 * np.abs(u).max())


def sgdp_step(w, g, lr, **kwargs):
    variable = keras.Variable(w)
    optimizer = SGDP(learning_rate=lr, momentum=0.0, weight_decay=0.0, **kwargs)
    optimizer.build([variable])
    optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
    return keras.ops.convert_to_numpy(variable.value).astype("float64")


@SETTINGS
@given(cases.filter(lambda c: c["lean"] < 0.9))
def test_sgdp_norm_grows_by_exactly_lr_squared_update_squared(case):
    """The paper's Lemma 2.2: with the projection and no weight decay,
    ||w_{t+1}||^2 = ||w_t||^2 + lr^2 ||u_t||^2 (u_t the projected update). The
    gradient leans towards w (below the threshold), so without the projection
    the radial part would change the norm by 2 lr <w, g> as well."""
    w, g = draw(case)
    assert decision(w, g) != projection.NOT_PROJECTED
    lr = 0.3 * float(np.linalg.norm(w)) / float(np.linalg.norm(g))
    w1 = sgdp_step(w, g, lr)
    u = (w.astype("float64") - w1) / lr  # the update actually applied
    w0_sq = float(np.sum(w.astype("float64") ** 2))
    expected = w0_sq + lr**2 * float(np.sum(u**2))
    assert float(np.sum(w1**2)) == pytest.approx(expected, rel=2e-6)


def test_norm_identity_fails_without_the_projection():
    """Guards the test above against passing vacuously."""
    case = dict(shape=(8, 3), seed=3, scale=1.0, lean=0.8, per_channel=True)
    w, g = draw(case)
    lr = 0.3 * float(np.linalg.norm(w)) / float(np.linalg.norm(g))
    w1 = sgdp_step(w, g, lr, delta=0.0)
    u = (w.astype("float64") - w1) / lr
    expected = float(np.sum(w.astype("float64") ** 2)) + lr**2 * np.sum(u**2)
    assert float(np.sum(w1**2)) != pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: AdamP(learning_rate=0.01, weight_decay=0.1, **kw),
        lambda **kw: AdamP(learning_rate=0.01, nesterov=True, **kw),
        lambda **kw: SGDP(learning_rate=0.05, momentum=0.9, weight_decay=0.1, **kw),
    ],
    ids=["adamp", "adamp_nesterov", "sgdp"],
)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=cases.filter(lambda c: c["lean"] > 1.5))
def test_failing_variable_is_updated_exactly_as_with_delta_zero(make, case):
    """A variable that fails the scale-invariance test (for both views) gets
    the plain Adam/SGD step with full weight decay, bit for bit, and its
    optimizer state (moments, SGDP's buffer) is the same too."""
    w, g = draw(case)
    assume(decision(w, g) == projection.NOT_PROJECTED)
    results = []
    for delta in (DELTA, 0.0):
        variable = keras.Variable(w)
        optimizer = make(delta=delta)
        optimizer.build([variable])
        optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
        results.append(
            [keras.ops.convert_to_numpy(v) for v in [variable, *optimizer.variables]]
        )
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
