"""The torch step of `Projected` (`keras_adamp._torch_projected`).

Its two orders take the step of the generic keras.ops path: on the CPU each
kernel is decided before the inner's step and only the kernels that pass are
copied and corrected, one kernel at a time where Keras's executor allows it;
elsewhere everything is copied and decided on the device. Keras's executors
that are stepped one variable at a time step each variable alone, and the
one that does not (Nadam) is not among them."""

import importlib

import keras
import numpy as np
import pytest
from _data import conv_bn_model
from _data import digits
from _data import ignore_guessed_channels

from keras_adamp import Projected

pytestmark = [
    pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch executor"),
    ignore_guessed_channels,
]

# name -> shape; sizes above `_torch._BLOCK` take the sums in blocks: by
# rows (a kernel's (rows, C)), rows as channels (axis 0 here), the whole
# tensor as one group.
SHAPES = {
    "conv_kernel": (3, 3, 64, 256),
    "table_embeddings": (700, 200),
    "whole_kernel": (600, 256),
    "dense_kernel": (16, 8),
    "dense_bias": (8,),
}
CHANNEL_AXES = {"table_embeddings": 0, "whole_kernel": []}
# Per step, the gradients of the kernels: orthogonal to the weight per
# channel ("channel") or as a whole ("layer"), or correlated with it (None,
# no view passes). A kernel that passed and then not, and the other way
# round, had its copy made in the sums' blocks in vain, or apart.
KINDS = ["channel", None, "channel", "layer", None, None, "channel", "channel"]


def _axes(name, shape):
    axes = CHANNEL_AXES.get(name, len(shape) - 1)
    axes = [axes] if isinstance(axes, int) else axes
    return tuple(a for a in range(len(shape)) if a not in axes)


def run(optimizer, kinds=KINDS):
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.normal(0, 0.05, shape).astype("float32"), name=name)
        for name, shape in SHAPES.items()
    ]
    optimizer.build(variables)
    for kind in kinds:
        grads = []
        for (name, shape), v in zip(SHAPES.items(), variables):
            w = keras.ops.convert_to_numpy(v)
            r = rng.normal(0, 1e-2, shape).astype("float32")
            if len(shape) == 1 or kind is None:
                grads.append(r + 0.5 * w)
                continue
            axes = _axes(name, shape) if kind == "channel" else None
            wr = np.sum(w * r, axis=axes, keepdims=True)
            grads.append(r - w * wr / np.sum(w * w, axis=axes, keepdims=True))
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


INNERS = {
    # Keras's executor, stepped one variable at a time.
    "adamw": lambda: keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.05),
    "lion": lambda: keras.optimizers.Lion(learning_rate=1e-3, weight_decay=0.1),
    # Keras's executor, stepped once (its step advances a shared product).
    "nadam": lambda: keras.optimizers.Nadam(learning_rate=0.01, weight_decay=0.05),
    # Keras's generic step (update_step per variable), stepped once.
    "lamb": lambda: keras.optimizers.Lamb(learning_rate=0.01),
}


@pytest.mark.parametrize("inner", list(INNERS))
def test_the_host_and_device_orders_take_the_generic_paths_step(inner, monkeypatch):
    from keras_adamp import _torch
    from keras_adamp import _torch_projected

    def wrapped():
        return Projected(INNERS[inner](), channel_axes=CHANNEL_AXES)

    host = run(wrapped())
    monkeypatch.setattr(_torch_projected, "HOST_DECISIONS", False)
    device = run(wrapped())
    monkeypatch.setattr(_torch, "ENABLED", False)
    generic = run(wrapped())
    plain = run(INNERS[inner]())
    for name, h, d, g, p in zip(SHAPES, host, device, generic, plain):
        np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(d, g, rtol=1e-5, atol=1e-7, err_msg=name)
        if len(SHAPES[name]) == 1:
            np.testing.assert_array_equal(h, p, err_msg=name)
        else:  # projected at some step: elsewhere than the inner alone
            assert np.max(np.abs(h - p)) > 1e-6, name


def test_a_step_where_nothing_passes_is_the_inners_step_exactly():
    got = run(Projected(INNERS["adamw"](), channel_axes=CHANNEL_AXES), [None])
    want = run(INNERS["adamw"](), [None])
    for name, g, w in zip(SHAPES, got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("inner, shared", [("adamw", True), ("nadam", False)])
def test_the_copies_buffers(inner, shared):
    # Stepped one kernel at a time: one buffer of the largest kernel's size
    # holds every copy; stepped once: one buffer per kernel that passed.
    optimizer = Projected(INNERS[inner](), channel_axes=CHANNEL_AXES)
    run(optimizer, ["channel"])
    state = optimizer.__dict__["_torch_state"]
    buffers = {k: v for k, v in state.items() if k[0] in ("shared", "own")}
    kernels = [int(np.prod(s)) for s in SHAPES.values() if len(s) > 1]
    if shared:
        (buffer,) = buffers.values()
        assert buffer.numel() == max(kernels)
    else:
        assert sorted(b.numel() for b in buffers.values()) == sorted(kernels)


def test_the_executors_stepped_one_variable_at_a_time_step_each_alone():
    import torch

    from keras_adamp import _torch_projected

    assert _torch_projected._PER_VARIABLE
    cases = [(m, n, True) for m, n in sorted(_torch_projected._PER_VARIABLE)]
    cases.append(("keras.src.backend.torch.optimizers.torch_nadam", "Nadam", False))
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    grads = [
        [torch.tensor(rng.normal(size=s).astype("float32")) for s in shapes]
        for _ in range(3)
    ]
    for module, name, alone in cases:
        # The names are those of the classes Keras instantiates on torch.
        cls = getattr(importlib.import_module(module), name)
        public = getattr(keras.optimizers, name)
        assert type(public()) is cls
        assert _torch_projected._per_variable(public()) is alone
        results = []
        for one_by_one in (False, True):
            optimizer = public(learning_rate=0.01)
            variables = [keras.Variable(x) for x in start]
            optimizer.build(variables)
            for g in grads:
                lr = optimizer.learning_rate
                if one_by_one:
                    for k in range(len(variables)):
                        optimizer._backend_update_step([g[k]], [variables[k]], lr)
                else:
                    optimizer._backend_update_step(g, variables, lr)
                optimizer.iterations.assign_add(1)
            results.append([keras.ops.convert_to_numpy(v) for v in variables])
        same = all(np.array_equal(a, b) for a, b in zip(*results))
        assert same is alone, name


def test_torch_compile_takes_the_eager_step(monkeypatch):
    # Under torch.compile the device order runs (no decision read on the
    # host, which would break the graph); eagerly on the CPU the host order.
    from keras_adamp import _torch_projected

    ran = []
    for name in ("_step_on_host", "_step_on_device"):
        order = getattr(_torch_projected, name)

        def counted(*args, order=order, name=name):
            ran.append(name)
            return order(*args)

        monkeypatch.setattr(_torch_projected, name, counted)
    x, y = digits(192)
    results, orders = [], []
    for jit_compile in (False, True):
        ran.clear()
        model = conv_bn_model(0)
        model.compile(
            optimizer=Projected(keras.optimizers.Lion(learning_rate=1e-3)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
        assert model.jit_compile is jit_compile
        results.append(model.get_weights())
        orders.append(set(ran))
    assert orders == [{"_step_on_host"}, {"_step_on_device"}]
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
