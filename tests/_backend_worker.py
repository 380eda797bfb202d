"""One Keras backend per process, for tests/test_backends.py.

Keras fixes its backend at import, so anything that needs a second backend (or,
for JAX, a second host device: XLA_FLAGS must be set before JAX starts) runs
here, in a subprocess whose environment names it:

    KERAS_BACKEND=jax python tests/_backend_worker.py COMMAND WORKDIR

Commands read their inputs from WORKDIR and write `.npz` results there; the
test process compares them. Each prints one JSON line of facts on success and
exits non-zero (with a traceback) on failure. The model and data helpers are
imported by the tests too, so both sides train the same thing.
"""

import json
import os
import sys

import numpy as np

# Same batches, same order, in every process.
FIT = dict(batch_size=32, epochs=1, shuffle=False, verbose=0)


def data(n=128, seed=0):
    """A fixed classification problem: 8x8 one-channel images, 10 classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 1)).astype("float32")
    w = rng.standard_normal((64, 10)).astype("float32")
    y = np.argmax(x.reshape(n, 64) @ w, axis=1).astype("int32")
    return x, y


def model(seed=0):
    """Conv and Dense kernels followed by BatchNorm: AdamP's case."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(16, use_bias=False, name="hidden"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(10, name="logits"),
        ]
    )


def compile_adamp(net, **kwargs):
    import keras

    import keras_adamp

    net.compile(
        optimizer=keras_adamp.AdamP(learning_rate=0.01, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return net


def to_numpy(values):
    import keras

    return [keras.ops.convert_to_numpy(v) for v in values]


def save_arrays(path, arrays):
    np.savez(path, *arrays)


def load_arrays(path):
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


# --- commands -----------------------------------------------------------------


def resume(workdir):
    """Loads `model.keras` (saved on another backend), checks that the optimizer
    state came with it, trains one more epoch, writes `resumed.npz`."""
    import keras

    import keras_adamp  # noqa: F401  (registers AdamP for load_model)

    net = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    saved_state = load_arrays(os.path.join(workdir, "state.npz"))
    state = to_numpy(net.optimizer.variables)
    assert len(state) == len(saved_state), (len(state), len(saved_state))
    for loaded, saved in zip(state, saved_state):
        np.testing.assert_array_equal(loaded, saved)
    # The compile config carries the source backend's resolved jit_compile
    # (True from TensorFlow and JAX), which on torch means torch.compile: it
    # works, but costs a minute here. Use this backend's own default instead.
    net.jit_compile = keras.backend.backend() != "torch"
    x, y = data()
    net.fit(x, y, **FIT)
    save_arrays(os.path.join(workdir, "resumed.npz"), to_numpy(net.weights))
    return {
        "backend": keras.backend.backend(),
        "optimizer": type(net.optimizer).__name__,
        "iterations": int(keras.ops.convert_to_numpy(net.optimizer.iterations)),
        "state_arrays": len(state),
    }


def _devices_of(variable):
    return len(variable.value.sharding.device_set)


def _two_devices_and_one_device_run():
    """JAX's two host devices, the data, and the one-device reference run:
    (devices, x, y, trained model, its initial weights)."""
    import keras

    assert keras.backend.backend() == "jax"
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 2, devices
    x, y = data()
    single = compile_adamp(model())
    initial = single.get_weights()
    single.fit(x, y, **FIT)
    return devices, x, y, single, initial


def data_parallel(workdir):
    """JAX: the same training on one device and with DataParallel over two
    host devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)."""
    import jax
    import keras

    devices, x, y, single, initial = _two_devices_and_one_device_run()
    distribution = keras.distribution.DataParallel(devices=devices)
    with distribution.scope():
        parallel = compile_adamp(model())
        parallel.set_weights(initial)
        parallel.fit(x, y, **FIT)
        kernel = parallel.get_layer("conv").kernel
        slots = parallel.optimizer.variables
        facts = {
            "kernel_devices": _devices_of(kernel),
            "slot_devices": min(_devices_of(v) for v in slots),
            "jax_devices": len(jax.devices()),
        }
    save_arrays(os.path.join(workdir, "single.npz"), single.get_weights())
    save_arrays(os.path.join(workdir, "parallel.npz"), parallel.get_weights())
    return facts


def model_parallel(workdir):
    """JAX: ModelParallel with the Dense kernel sharded on its output-channel
    (last) axis over two host devices, against one device; and the
    projection's decision on the sharded kernel against the unsharded one."""
    import jax
    import keras

    from keras_adamp import projection

    devices, x, y, single, initial = _two_devices_and_one_device_run()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")  # (in, out): shard `out`
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        parallel = compile_adamp(model())
        parallel.set_weights(initial)
        parallel.fit(x, y, **FIT)
        kernel = parallel.get_layer("hidden").kernel
        spec = tuple(kernel.value.sharding.spec)
        momentum = parallel.optimizer._momentums[
            parallel.optimizer._get_variable_index(kernel)
        ]
        momentum_spec = tuple(momentum.value.sharding.spec)

        # The decision for gradients that force each branch, on the sharded
        # kernel (a jitted, sharded computation) and on a plain copy.
        layout = parallel.optimizer.channel_layout(kernel)
        w = np.asarray(keras.ops.convert_to_numpy(kernel.value), np.float64)
        rng = np.random.default_rng(1)
        r = rng.standard_normal(w.shape)
        gradients = {
            "channel": r - w * (r * w).sum(0) / (w * w).sum(0),
            "layer": r - w * (r * w).sum() / (w * w).sum(),
            "none": r + w * np.linalg.norm(r) / np.linalg.norm(w),
        }
        decide = jax.jit(
            lambda w, g: projection.scale_invariance(w, g, layout, 0.1, 1e-8)
        )
        decisions = {}
        for name, g in gradients.items():
            g = jax.device_put(g.astype("float32"), kernel.value.sharding)
            sharded = int(decide(kernel.value, g))
            plain = int(
                projection.scale_invariance(
                    keras.ops.convert_to_tensor(w.astype("float32")),
                    keras.ops.convert_to_tensor(np.asarray(g)),
                    layout,
                    0.1,
                    1e-8,
                )
            )
            decisions[name] = [sharded, plain]
    save_arrays(os.path.join(workdir, "single.npz"), single.get_weights())
    save_arrays(os.path.join(workdir, "parallel.npz"), parallel.get_weights())
    return {
        "kernel_spec": [s for s in spec],
        "momentum_spec": [s for s in momentum_spec],
        "kernel_devices": _devices_of(kernel),
        "decisions": decisions,
    }


def jax_jit_traces(workdir):
    """JAX: how often our per-variable update (`_assign`) runs, and on what,
    in `fit` with and without jit_compile. Under jax.jit it runs once per variable, at tracing,
    on tracers; without, once per variable per batch on concrete arrays."""
    import jax
    import keras

    assert keras.backend.backend() == "jax"
    x, y = data()
    facts = {"batches": len(x) // FIT["batch_size"]}
    for jit_compile in (True, False):
        net = compile_adamp(model(), jit_compile=jit_compile)
        optimizer = net.optimizer
        calls = []
        assign = optimizer._assign

        def counting_assign(
            index, variable, gradient, *rest, calls=calls, assign=assign
        ):
            calls.append(isinstance(gradient, jax.core.Tracer))
            return assign(index, variable, gradient, *rest)

        optimizer._assign = counting_assign
        history = net.fit(x, y, **FIT)
        facts[f"jit_{jit_compile}"] = {
            "model_jit_compile": net.jit_compile,
            "calls": len(calls),
            "tracer_calls": sum(calls),
            "variables": len(net.trainable_variables),
            "iterations": int(keras.ops.convert_to_numpy(optimizer.iterations)),
            "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
        }
    return facts


def torch_state_device(workdir):
    """torch: after an eager `fit`, where each optimizer variable lives."""
    import keras
    import torch

    assert keras.backend.backend() == "torch"
    x, y = data()
    net = compile_adamp(model())
    history = net.fit(x, y, **FIT)
    optimizer = net.optimizer
    mismatches = []
    slots = 0
    for variable in net.trainable_variables:
        index = optimizer._get_variable_index(variable)
        for slot in (optimizer._momentums[index], optimizer._velocities[index]):
            slots += 1
            if not (
                isinstance(slot.value, torch.Tensor)
                and slot.value.device == variable.value.device
                and slot.dtype == variable.dtype
            ):
                mismatches.append(f"{variable.path}: {slot.value.device}")
    first = net.trainable_variables[0].value.device
    return {
        "slots": slots,
        "variables": len(net.trainable_variables),
        "mismatches": mismatches,
        "iterations_on_variable_device": optimizer.iterations.value.device == first,
        "device": str(first),
        "loss_finite": bool(np.isfinite(history.history["loss"]).all()),
    }


COMMANDS = {
    f.__name__: f
    for f in (
        resume,
        data_parallel,
        model_parallel,
        jax_jit_traces,
        torch_state_device,
    )
}

if __name__ == "__main__":
    command, workdir = sys.argv[1], sys.argv[2]
    print(json.dumps(COMMANDS[command](workdir)))
