"""Oracle parity on attention kernels, grouped by `channel_axes_for`.

The official PyTorch AdamP/SGDP group a weight by its axis 0. A Keras
attention kernel's output channels are several axes, not always contiguous:

* MultiHeadAttention query/key/value ``(d, heads, head_dim)``: axes (1, 2),
  the rows of torch's ``in_proj_weight``;
* its output kernel ``(heads, head_dim, d)``: axis 2 (``out_proj`` rows);
* a Gemma-style query kernel ``(heads, d, head_dim)``
  (``btd,ndh->btnh``): axes (0, 2).

The torch weight is the Keras kernel with its output axes moved first and
flattened: ``transpose(w, out_axes + other_axes).reshape(C, -1)``. Same
initial weights, same gradients, 30 steps, every branch forced.
"""

import functools
import re

import keras
import numpy as np
import pytest
from test_oracle_parity import BRANCH_CODE
from test_oracle_parity import RTOL
from test_oracle_parity import STEPS
from test_oracle_parity import forced_gradient
from test_oracle_parity import keras_optimizer
from test_oracle_parity import torch_optimizer

import keras_adamp
from keras_adamp import projection

KERNELS = {
    "query": (1, 2),
    "key": (1, 2),
    "value": (1, 2),
    "attention_output": (2,),
    "gemma_query": (0, 2),
}


@functools.cache
def attention_model():
    """Built once: each run assigns its own initial weights."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((4, 5))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(
        tokens, tokens
    )
    x = keras.layers.EinsumDense(
        "btd,ndh->btnh", output_shape=(None, 2, 3), name="gemma_query"
    )(x)
    return keras.Model(tokens, x)


@functools.cache
def channel_axes_of_model():
    return keras_adamp.channel_axes_for(attention_model())


def kernel_and_axes(kernel_name):
    """The kernel and its `channel_axes_for` entry."""
    model = attention_model()
    axes = channel_axes_of_model()
    if kernel_name == "gemma_query":
        variable = model.get_layer("gemma_query").kernel
    else:
        variable = getattr(
            model.get_layer("mha"),
            "output_dense"
            if kernel_name == "attention_output"
            else f"{kernel_name}_dense",
        ).kernel
    key = "^" + re.escape(variable.path) + "$"
    return variable, {key: axes[key]}


def to_torch(w, out_axes):
    rest = tuple(a for a in range(w.ndim) if a not in out_axes)
    moved = np.transpose(w, out_axes + rest)
    return moved.reshape(int(np.prod(moved.shape[: len(out_axes)])), -1), moved.shape


def from_torch(t, out_axes, moved_shape):
    ndim = len(moved_shape)
    rest = tuple(a for a in range(ndim) if a not in out_axes)
    return np.transpose(t.reshape(moved_shape), np.argsort(out_axes + rest))


def run_layout_parity(oracle, kernel_name, branch, optimizer_name, override=None):
    torch, _ = oracle
    rng = np.random.default_rng(1)
    variable, channel_axes = kernel_and_axes(kernel_name)
    out_axes = KERNELS[kernel_name]
    assert list(channel_axes.values()) == [list(out_axes)]
    w0 = rng.standard_normal(tuple(variable.shape)).astype(np.float32)
    variable.assign(w0)
    w_torch, moved_shape = to_torch(w0, out_axes)
    param = torch.nn.Parameter(torch.from_numpy(w_torch.copy()))
    reference = torch_optimizer(oracle, optimizer_name, [param])
    ours = keras_optimizer(optimizer_name, channel_axes=override or channel_axes)
    ours.build([variable])
    layout = ours.channel_layout(variable)
    for step in range(STEPS):
        grad_torch = forced_gradient(param.detach().numpy(), branch, rng)
        grad_keras = from_torch(grad_torch, out_axes, moved_shape)
        if override is None:
            decision = projection.scale_invariance(
                variable.value, grad_keras, layout, ours.delta, ours.epsilon
            )
            assert int(decision) == BRANCH_CODE[branch], (
                f"step {step}: gradient did not force the '{branch}' branch"
            )
        param.grad = torch.from_numpy(grad_torch.copy())
        reference.step()
        ours.apply([grad_keras], [variable])
        expected = from_torch(param.detach().numpy(), out_axes, moved_shape)
        actual = keras.ops.convert_to_numpy(variable.value)
        error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
        assert error <= RTOL, (
            f"step {step}: max relative error {error:.2e} > {RTOL:.0e}"
        )


@pytest.mark.parametrize("optimizer_name", ["adamp", "sgdp"])
@pytest.mark.parametrize("branch", ["channel", "layer", "none"])
@pytest.mark.parametrize("kernel_name", ["query", "attention_output", "gemma_query"])
def test_attention_kernels_match_reference(oracle, kernel_name, branch, optimizer_name):
    run_layout_parity(oracle, kernel_name, branch, optimizer_name)


@pytest.mark.parametrize("optimizer_name", ["adamp_nesterov", "sgdp_nesterov"])
@pytest.mark.parametrize("kernel_name", ["key", "value"])
def test_key_and_value_kernels_match_reference(oracle, kernel_name, optimizer_name):
    # Same shape and equation as the query kernel: the channel branch only.
    run_layout_parity(oracle, kernel_name, "channel", optimizer_name)


@pytest.mark.parametrize(
    "kernel_name, wrong_axes", [("query", [2]), ("gemma_query", [2])]
)
def test_parity_check_detects_the_static_grouping(oracle, kernel_name, wrong_axes):
    """The static rules' grouping (head_dim alone) is not the reference's:
    the same harness fails with it on the channel branch."""
    variable, _ = kernel_and_axes(kernel_name)
    override = {"^" + re.escape(variable.path) + "$": wrong_axes}
    with pytest.raises(AssertionError, match="relative error"):
        run_layout_parity(oracle, kernel_name, "channel", "adamp", override=override)
