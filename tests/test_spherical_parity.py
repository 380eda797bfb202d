"""AdamS, AdamSRT and SGDMRT equal the authors' PyTorch code (golden
trajectories in tests/data/spherical_reference.npz, a copy of
shared/golden/spherical_reference.npz: 24 cases x 20 steps), and the
transported first moment is tangent to the sphere."""

import json
import os

import keras
import numpy as np
import pytest

import keras_adamp

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "spherical_reference.npz")


def _golden():
    data = np.load(GOLDEN)
    return data, json.loads(str(data["spec_json"]))


DATA, SPEC = _golden()


def make_optimizer(spec, spherical):
    """Our optimizer with the reference's hyperparameters of `spec`."""
    h = spec["hyperparameters"]
    if spec["optimizer"] == "SGDMRT":
        return keras_adamp.SGDMRT(
            h["lr"],
            momentum=h["momentum"],
            dampening=h["dampening"],
            l2=h["weight_decay"],
            spherical=spherical,
        )
    cls = {"AdamS": keras_adamp.AdamS, "AdamSRT": keras_adamp.AdamSRT}
    return cls[spec["optimizer"]](
        learning_rate=h["lr"],
        beta_1=h["betas"][0],
        beta_2=h["betas"][1],
        epsilon=h["eps"],
        l2=h["weight_decay"],
        spherical=spherical,
    )


def designation(spec):
    """(spherical, channel_axes) for the case's grouping."""
    group = spec["group"]
    if group.startswith("not designated"):
        return [], None
    if group.startswith("one group"):
        return "kernel", {"kernel": []}
    assert group.startswith("output channel"), group
    return "kernel", None


def full_second_moment(optimizer, variable):
    """The second-moment slot broadcast to the variable's shape."""
    v = keras.ops.convert_to_numpy(optimizer._velocities[0])
    layout = optimizer.channel_layout(variable)
    if layout is None:
        return v
    v = v.reshape(layout.channel_view)
    return np.broadcast_to(v, layout.view).reshape(layout.shape)


def run_case(case):
    """Yields (step, weight, first moment, second moment or None), ours."""
    spec = SPEC[case]
    w0 = DATA[f"{spec['inputs']}/w0"]
    grads = DATA[f"{spec['inputs']}/grads"]
    spherical, channel_axes = designation(spec)
    optimizer = make_optimizer(spec, spherical)
    optimizer.channel_axes = channel_axes
    variable = keras.Variable(w0, name="kernel")
    optimizer.build([variable])
    for step, g in enumerate(grads):
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
        m = keras.ops.convert_to_numpy(optimizer._momentums[0])
        v = (
            full_second_moment(optimizer, variable)
            if spec["optimizer"] != "SGDMRT"
            else None
        )
        yield step, keras.ops.convert_to_numpy(variable), m, v


def relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)


@pytest.mark.parametrize("case", sorted(SPEC))
def test_trajectory_equals_the_reference(case):
    spec = SPEC[case]
    for step, w, m, v in run_case(case):
        errors = {
            "w": relative_error(w, DATA[f"{case}/w"][step]),
            "m": relative_error(m, DATA[f"{case}/m"][step]),
        }
        if v is not None:
            errors["v"] = relative_error(v, DATA[f"{case}/v"][step])
        assert max(errors.values()) <= 1e-5, (step, errors)
    # The case is not trivial: the weight moved by far more than the tolerance.
    w0 = DATA[f"{spec['inputs']}/w0"]
    assert relative_error(DATA[f"{case}/w"][-1], w0) > 1e-3


def test_golden_file_covers_every_optimizer_and_grouping():
    kinds = {(s["optimizer"], s["group"].split(" ")[0]) for s in SPEC.values()}
    assert kinds == {
        (o, g) for o in ("AdamS", "AdamSRT", "SGDMRT") for g in ("output", "one", "not")
    }
    assert len(SPEC) == 24


def _group_cosines(layout, a, w):
    """|<a, w>_c| / (||a_c|| ||w_c||) per group."""
    a = a.reshape(layout.view)
    w = w.reshape(layout.view)
    axes = layout.reduce_axes
    dot = np.sum(a * w, axis=axes)
    norms = np.sqrt(np.sum(a * a, axis=axes) * np.sum(w * w, axis=axes))
    return np.abs(dot) / norms


@pytest.mark.parametrize(
    "case",
    [c for c in sorted(SPEC) if not SPEC[c]["group"].startswith("not")],
)
def test_first_moment_is_tangent_at_the_new_point_after_transport(case):
    cosines = []
    for _, w, m, _ in run_case(case):
        cosines.append(
            _group_cosines(
                keras_adamp.layouts.ChannelLayout.create(
                    w.shape, () if SPEC[case]["group"].startswith("one") else -1
                ),
                m,
                w,
            )
        )
    cosines = np.array(cosines)
    if SPEC[case]["optimizer"] == "AdamS":
        # No transport: the first moment has a radial part (the test can fail).
        assert np.max(cosines) > 1e-2
    else:
        assert np.max(cosines) <= 1e-5, np.max(cosines)
