"""The variable sets the optimizer benchmarks step, and their fixed random
weights and gradients: as Keras variables, backend tensors, or torch
parameters in PyTorch's layout for the official code.

Import after `_common.select_backend` (it imports Keras).
"""

import contextlib
import re

import keras
import numpy as np

import keras_adamp


def build_model(model_name):
    """ResNet-50 (weights=None), or "resnet18ish": 8 Conv+BN blocks and a
    Dense head, a small set for a smoke run."""
    if model_name == "resnet50":
        return keras.applications.ResNet50(weights=None)
    inputs = keras.Input((64, 64, 3))
    x = inputs
    for filters in (64, 64, 128, 128, 256, 256, 512, 512):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(1000)(x)
    return keras.Model(inputs, x)


def model_specs(model_name):
    """[(name, shape, designated)] of the model's trainable variables (Keras
    layout); `designated`: whether `keras_adamp.normalized_kernels(model)`
    (the spherical optimizers' set) holds it."""
    model = build_model(model_name)
    regex = keras_adamp.normalized_kernels(model)
    pattern = re.compile(regex) if regex else None
    specs = [
        (
            v.path.replace("/", "__"),  # a Variable's name can't hold "/"
            tuple(v.shape),
            bool(pattern and pattern.search(v.path)),
        )
        for v in model.trainable_variables
    ]
    del model
    keras.backend.clear_session()
    return specs


def kernel_specs(count, size):
    """`count` kernels of `size` x `size`, each designated."""
    return [(f"kernel_{i}", (size, size), True) for i in range(count)]


def make_data(specs, seed=0):
    """Fixed random weights and gradients (NumPy float32) of the specs."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 0.05, s).astype("float32") for _, s, _ in specs]
    grads = [rng.normal(0, 1e-3, s).astype("float32") for _, s, _ in specs]
    return weights, grads


def keras_variables(specs, weights, scope=None):
    """Keras variables of the weights (created in `scope()`, if given) and a
    function that gives the designated ones."""
    with scope() if scope else contextlib.nullcontext():
        variables = [keras.Variable(w, name=n) for (n, _, _), w in zip(specs, weights)]

    def designated():
        return [v for v, (_, _, d) in zip(variables, specs) if d]

    return variables, designated


def torch_layout(shape):
    """Keras kernel shape -> PyTorch's (out, in, *k)."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) >= 3:
        return (shape[-1], shape[-2]) + tuple(shape[:-2])
    return shape


def torch_parameters(weights, grads, device="cpu"):
    """torch parameters of the weights in PyTorch's layout, with the
    gradients as their `.grad`."""
    import torch

    def to_torch(x):
        return torch.from_numpy(x.copy()).reshape(torch_layout(x.shape)).to(device)

    params = [torch.nn.Parameter(to_torch(w)) for w in weights]
    for p, g in zip(params, grads):
        p.grad = to_torch(g)
    return params


def slot_report(optimizer, variables):
    """Optimizer variables of a model variable's shape, per model variable."""
    shapes = {tuple(v.shape) for v in variables}
    big = [v for v in optimizer.variables if tuple(v.shape) in shapes and len(v.shape)]
    slot_elems = sum(int(np.prod(v.shape)) for v in big)
    var_elems = sum(int(np.prod(v.shape)) for v in variables)
    return {
        "slot_variables": len(big),
        "slots_per_variable": len(big) / len(variables),
        "slot_elements_per_param": slot_elems / var_elems,
    }
