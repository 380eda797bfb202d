"""Numerical robustness over 1000 steps, against the official PyTorch code.

One optimizer holds one variable per degenerate case, so a single compiled
step (tf.function on TensorFlow, jax.jit of `stateless_apply` on JAX, eager on
torch) advances all of them; the reference takes the same gradients. "Sane"
means finite, and equal to what the reference does (for weights of 1e20 the
reference's own float32 norms overflow; we must make the same decisions).
"""

import keras
import numpy as np
import pytest

from keras_adamp import SGDP
from keras_adamp import AdamP

STEPS = 1000
SHAPE = (6, 4)  # a Dense kernel (in, out); the reference's layout is (out, in)


def initial_weights(rng):
    w = lambda: rng.standard_normal(SHAPE).astype("float32")
    zero_channel = w()
    zero_channel[:, 0] = 0.0
    return {
        "zero_kernel": np.zeros(SHAPE, "float32"),
        "zero_channel": zero_channel,
        "zero_gradient": w(),
        "huge_weight": w() * np.float32(1e20),
        "tiny_weight": w() * np.float32(1e-20),
        "tiny_gradient": w(),
        "bias": rng.standard_normal(SHAPE[1]).astype("float32"),
    }


GRADIENT_SCALE = {"zero_gradient": 0.0, "tiny_gradient": 1e-30}

OPTIMIZERS = {
    "adamp": (
        lambda: AdamP(learning_rate=0.01, weight_decay=0.01),
        lambda adamp, params: adamp.AdamP(params, lr=0.01, weight_decay=0.01),
    ),
    "sgdp": (
        lambda: SGDP(learning_rate=0.01, momentum=0.9, weight_decay=0.01),
        lambda adamp, params: adamp.SGDP(
            params, lr=0.01, momentum=0.9, weight_decay=0.01
        ),
    ),
}


def gradient_sequence(names, rng):
    """{name: (STEPS, *shape)} float32 gradients."""
    grads = {}
    for name, shape in names.items():
        g = rng.standard_normal((STEPS, *shape))
        grads[name] = (g * GRADIENT_SCALE.get(name, 1.0)).astype("float32")
    return grads


def compiled_stepper(optimizer, variables):
    """step(list of gradients) applying `optimizer`, compiled where the
    backend allows, and finish() writing the state back."""
    backend = keras.backend.backend()
    optimizer.build(variables)
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda grads: optimizer.apply(grads, variables))
        return step, lambda: None
    if backend == "jax":
        import jax

        state = {
            "trainable": [v.value for v in variables],
            "optimizer": [v.value for v in optimizer.variables],
        }
        apply = jax.jit(optimizer.stateless_apply)

        def step(grads):
            state["trainable"], state["optimizer"] = apply(
                state["optimizer"], grads, state["trainable"]
            )

        def finish():
            for v, value in zip(variables, state["trainable"]):
                v.assign(value)
            for v, value in zip(optimizer.variables, state["optimizer"]):
                v.assign(value)

        return step, finish
    # torch: eager (the suite's other tests cover torch.compile-free paths)
    return lambda grads: optimizer.apply(grads, variables), lambda: None


def run_ours(make, weights, grads):
    names = list(weights)
    variables = [keras.Variable(weights[n], name=n) for n in names]
    optimizer = make()
    step, finish = compiled_stepper(optimizer, variables)
    for t in range(STEPS):
        step([keras.ops.convert_to_tensor(grads[n][t]) for n in names])
    finish()
    return {n: keras.ops.convert_to_numpy(v.value) for n, v in zip(names, variables)}


def run_reference(oracle, make, weights, grads):
    torch, adamp = oracle
    # Keras (in, out) <-> torch (out, in): transpose the kernels.
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.T))
    params = {n: torch.nn.Parameter(to_torch(w)) for n, w in weights.items()}
    optimizer = make(adamp, list(params.values()))
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = to_torch(grads[n][t])
        optimizer.step()
    return {n: p.detach().numpy().T for n, p in params.items()}


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_thousand_degenerate_steps_stay_finite_and_match_reference(
    oracle, optimizer_name
):
    rng = np.random.default_rng(0)
    weights = initial_weights(rng)
    grads = gradient_sequence({n: w.shape for n, w in weights.items()}, rng)
    ours_make, reference_make = OPTIMIZERS[optimizer_name]
    ours = run_ours(ours_make, weights, grads)
    expected = run_reference(oracle, reference_make, weights, grads)

    for name in weights:
        assert np.all(np.isfinite(ours[name])), name
        assert np.all(np.isfinite(expected[name])), name
        scale = np.abs(expected[name]).max()
        error = np.abs(ours[name] - expected[name]).max() / scale
        assert error <= 1e-4, f"{name}: relative error {error:.2e}"

    # Sanity beyond agreement: the zero channel and the zero kernel trained
    # (a 0/0 in the projection would have frozen or poisoned them) ...
    assert np.abs(ours["zero_kernel"]).min() > 0
    assert np.abs(ours["zero_channel"][:, 0]).min() > 0
    # ... weights of 1e20 only decayed, at the projected rate wd_ratio (their
    # norm overflows float32, so cos = 0: scale-invariant), and a zero
    # gradient only decays the weight, at wd_ratio too (cos(0, w) = 0).
    factor = 1 - 0.01 * 0.01 * 0.1 * (1 if optimizer_name == "adamp" else 10)
    np.testing.assert_allclose(
        ours["huge_weight"], weights["huge_weight"] * factor**STEPS, rtol=1e-4
    )
    np.testing.assert_allclose(
        ours["zero_gradient"], weights["zero_gradient"] * factor**STEPS, rtol=1e-4
    )


@pytest.mark.parametrize(
    "ours, keras_own",
    [
        (lambda: AdamP(0.01), lambda: keras.optimizers.Adam(0.01)),
        (
            lambda: SGDP(0.01, momentum=0.9),
            lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        ),
    ],
    ids=["adamp_vs_adam", "sgdp_vs_sgd"],
)
def test_nan_gradient_poisons_the_same_elements_as_keras_own_optimizer(ours, keras_own):
    """Outside loss scaling nothing filters a NaN gradient, in Keras's Adam/SGD
    or here: the NaN element's moments and weight become NaN for good. The
    projection must not spread it: the same elements, and only those, are NaN
    after the NaN step and two clean ones."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(SHAPE).astype("float32")
    b0 = rng.standard_normal(SHAPE[1]).astype("float32")
    grads = rng.standard_normal((3, *SHAPE)).astype("float32")
    grads[0, 1, 2] = np.nan
    bias_grads = rng.standard_normal((3, SHAPE[1])).astype("float32")
    bias_grads[0, 3] = np.nan
    masks = []
    for make in (ours, keras_own):
        w, b = keras.Variable(w0), keras.Variable(b0)
        optimizer = make()
        optimizer.build([w, b])
        for t in range(3):
            optimizer.apply(
                [
                    keras.ops.convert_to_tensor(grads[t]),
                    keras.ops.convert_to_tensor(bias_grads[t]),
                ],
                [w, b],
            )
        masks.append([np.isnan(keras.ops.convert_to_numpy(v.value)) for v in (w, b)])
    for ours_mask, keras_mask in zip(*masks):
        np.testing.assert_array_equal(ours_mask, keras_mask)
    assert masks[0][0].sum() == 1 and masks[0][0][1, 2]
    assert masks[0][1].sum() == 1 and masks[0][1][3]
