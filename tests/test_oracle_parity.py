"""Our AdamP/SGDP against the official PyTorch code (`adamp==0.3.0`).

Same initial weights, same gradients (transposed between the Keras and PyTorch
layouts), 30 steps. The gradients are built from the reference's current
weights to force each branch of the projection at every step:

* ``channel``: orthogonal to every output channel -> channel-wise projection;
* ``layer``: orthogonal to the whole tensor only -> layer-wise projection;
* ``none``: strongly aligned with the weight -> no projection.
"""

import keras
import numpy as np
import pytest

import keras_adamp
from keras_adamp import projection

STEPS = 30
RTOL = 1e-5

# name -> (Keras layer factory, input shape, variable attribute, Keras->torch axes)
LAYERS = {
    "dense": (lambda: keras.layers.Dense(6), (None, 10), "kernel", (1, 0)),
    "conv1d": (lambda: keras.layers.Conv1D(6, 3), (None, 8, 4), "kernel", (2, 1, 0)),
    "conv2d": (
        lambda: keras.layers.Conv2D(6, 3),
        (None, 8, 8, 4),
        "kernel",
        (3, 2, 0, 1),
    ),
    "conv3d": (
        lambda: keras.layers.Conv3D(4, 2),
        (None, 4, 4, 4, 3),
        "kernel",
        (4, 3, 0, 1, 2),
    ),
    "depthwise2d": (
        lambda: keras.layers.DepthwiseConv2D(3),
        (None, 8, 8, 5),
        "kernel",
        (2, 3, 0, 1),
    ),
    "separable_depthwise": (
        lambda: keras.layers.SeparableConv2D(4, 3),
        (None, 8, 8, 5),
        "depthwise_kernel",
        (2, 3, 0, 1),
    ),
    "embedding": (lambda: keras.layers.Embedding(12, 6), (None,), "embeddings", (0, 1)),
    "bias": (lambda: keras.layers.Dense(6), (None, 10), "bias", (0,)),
}

ADAMP_CONFIGS = {
    "adamp": dict(learning_rate=0.01, weight_decay=0.05),
    "adamp_nesterov": dict(learning_rate=0.01, weight_decay=0.05, nesterov=True),
}
SGDP_CONFIGS = {
    "sgdp": dict(learning_rate=0.05, momentum=0.9, weight_decay=0.01),
    "sgdp_nesterov": dict(
        learning_rate=0.05, momentum=0.9, weight_decay=0.01, nesterov=True
    ),
    "sgdp_dampening": dict(
        learning_rate=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01
    ),
    "sgdp_no_momentum": dict(learning_rate=0.05, weight_decay=0.01),
}
BRANCH_CODE = {
    "channel": projection.CHANNEL_WISE,
    "layer": projection.LAYER_WISE,
    "none": projection.NOT_PROJECTED,
}


def make_variable(layer_name):
    factory, input_shape, attribute, to_torch = LAYERS[layer_name]
    layer = factory()
    layer.build(input_shape)
    return getattr(layer, attribute), to_torch


def torch_optimizer(oracle, name, params):
    _, adamp = oracle
    config = {**ADAMP_CONFIGS, **SGDP_CONFIGS}[name]
    renamed = {
        "learning_rate": "lr",
        "momentum": "momentum",
        "dampening": "dampening",
        "weight_decay": "weight_decay",
        "nesterov": "nesterov",
    }
    kwargs = {renamed[k]: v for k, v in config.items()}
    cls = adamp.AdamP if name in ADAMP_CONFIGS else adamp.SGDP
    return cls(params, **kwargs)


def keras_optimizer(name, **overrides):
    if name in ADAMP_CONFIGS:
        return keras_adamp.AdamP(**ADAMP_CONFIGS[name], **overrides)
    return keras_adamp.SGDP(**SGDP_CONFIGS[name], **overrides)


def forced_gradient(w, branch, rng):
    """A gradient for torch-layout weight `w` (grouped by axis 0, as the
    reference groups) that forces `branch`. Built in float64."""
    w = w.astype(np.float64)
    r = rng.standard_normal(w.shape)
    if w.ndim <= 1 or branch == "none":
        # Strongly aligned with w: |cos| ~ 0.7, far above delta / sqrt(dim).
        return (r + w * (np.linalg.norm(r) / np.linalg.norm(w))).astype(np.float32)
    if branch == "channel":
        rows_w = w.reshape(w.shape[0], -1)
        rows_r = r.reshape(w.shape[0], -1)
        coef = (rows_r * rows_w).sum(1, keepdims=True) / (rows_w**2).sum(
            1, keepdims=True
        )
        return (rows_r - coef * rows_w).reshape(w.shape).astype(np.float32)
    # layer: orthogonal to the whole tensor; random per channel, so some
    # channel's |cos| is ~1/sqrt(group size), far above delta / sqrt(group size).
    return (r - (r * w).sum() / (w**2).sum() * w).astype(np.float32)


def run_parity(oracle, layer_name, branch, optimizer_name, seed=0, **overrides):
    """Steps both optimizers; asserts equal weights after every step and
    returns the largest relative error seen."""
    torch, _ = oracle
    rng = np.random.default_rng(seed)
    variable, to_torch = make_variable(layer_name)
    from_torch = tuple(np.argsort(to_torch))
    w0 = rng.standard_normal(tuple(variable.shape)).astype(np.float32)
    variable.assign(w0)
    param = torch.nn.Parameter(torch.from_numpy(np.transpose(w0, to_torch).copy()))
    reference = torch_optimizer(oracle, optimizer_name, [param])
    ours = keras_optimizer(optimizer_name, **overrides)
    ours.build([variable])
    layout = ours.channel_layout(variable)

    worst = 0.0
    for step in range(STEPS):
        grad_torch = forced_gradient(param.detach().numpy(), branch, rng)
        grad_keras = np.transpose(grad_torch, from_torch)
        if layout is not None and not overrides:
            decision = projection.scale_invariance(
                variable.value, grad_keras, layout, ours.delta, ours.epsilon
            )
            assert int(decision) == BRANCH_CODE[branch], (
                f"step {step}: gradient did not force the '{branch}' branch"
            )
        param.grad = torch.from_numpy(grad_torch.copy())
        reference.step()
        ours.apply([grad_keras], [variable])

        expected = np.transpose(param.detach().numpy(), from_torch)
        actual = keras.ops.convert_to_numpy(variable.value)
        error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
        assert error <= RTOL, (
            f"step {step}: max relative error {error:.2e} > {RTOL:.0e}"
        )
        worst = max(worst, error)
    return worst


KERNELS = [name for name in LAYERS if name != "bias"]


@pytest.mark.parametrize("optimizer_name", list(ADAMP_CONFIGS) + list(SGDP_CONFIGS))
@pytest.mark.parametrize("branch", ["channel", "layer", "none"])
@pytest.mark.parametrize("layer_name", KERNELS)
def test_matches_reference_on_kernels(oracle, layer_name, branch, optimizer_name):
    run_parity(oracle, layer_name, branch, optimizer_name)


@pytest.mark.parametrize("optimizer_name", list(ADAMP_CONFIGS) + list(SGDP_CONFIGS))
def test_matches_reference_on_bias_vectors(oracle, optimizer_name):
    run_parity(oracle, "bias", "none", optimizer_name)


@pytest.mark.parametrize("branch", ["channel", "layer"])
@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
def test_parity_check_detects_a_missing_projection(oracle, optimizer_name, branch):
    """Guards the parity tests against passing vacuously: the same harness
    fails when our projection is switched off (delta=0)."""
    with pytest.raises(AssertionError, match="relative error"):
        run_parity(oracle, "conv2d", branch, optimizer_name, delta=0.0)


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
def test_parity_check_detects_a_missing_decay_ratio(oracle, optimizer_name):
    """wd_ratio=1 (decay not reduced for projected weights) is caught too."""
    with pytest.raises(AssertionError, match="relative error"):
        run_parity(oracle, "dense", "channel", optimizer_name, wd_ratio=1.0)
