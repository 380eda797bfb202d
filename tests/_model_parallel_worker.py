"""Run by test_model_parallel.py in a fresh JAX process with 8 virtual CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): a tiny keras-hub
Gemma trained with AdamP and SGDP on one device, then under
`keras.distribution.ModelParallel` with `GemmaBackbone.get_layout_map` on a
2x4 (batch, model) mesh, from the same weights on the same batches.

Writes `facts.json` (per optimizer: the sharding spec of every variable and
of its slots) and `<optimizer>_single.npz` / `<optimizer>_parallel.npz` (the
trained weights) into the directory given as argv[1]; what XLA prints goes to
stderr, which the test reads."""

import json
import os
import sys

import keras
import keras_hub
import numpy as np

import keras_adamp

STEPS = 2
BATCH = 8
SEQUENCE = 8
VOCABULARY = 64

# AdamP with the layers' grouping (Gemma's query kernels (heads, d, head_dim)
# group by the non-contiguous axes (0, 2)), SGDP with the static rules. Adam
# amplifies the rounding differences of sharded matmuls (Keras's AdamW at
# lr 1e-2 differs by 1e-4 here between one device and the mesh): AdamP's
# learning rate keeps them below the test's 1e-5.
OPTIMIZERS = {
    "adamp": lambda model: keras_adamp.AdamP(
        learning_rate=1e-3,
        weight_decay=0.01,
        channel_axes=keras_adamp.channel_axes_for(model),
    ),
    "sgdp": lambda model: keras_adamp.SGDP(
        learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    ),
}


def gemma():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def data():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCABULARY, size=(BATCH * STEPS, SEQUENCE + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((BATCH * STEPS, SEQUENCE), "bool"),
    }
    return x, tokens[:, 1:].astype("int32")


def train(model, optimizer, x, y):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def spec(variable):
    return [None if s is None else str(s) for s in variable.value.sharding.spec]


def main(workdir):
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 8, devices
    x, y = data()
    facts = {}
    for name, make in OPTIMIZERS.items():
        single = gemma()
        initial = single.get_weights()
        np.savez(os.path.join(workdir, "initial.npz"), *initial)
        train(single, make(single), x, y)

        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
        layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
        with distribution.scope():
            parallel = gemma()
            parallel.set_weights(initial)
            optimizer = make(parallel)
            train(parallel, optimizer, x, y)
            slots = {}
            for variable in parallel.trainable_variables:
                # Keras names a slot `<variable path, / as _>_<slot name>`.
                prefix = variable.path.replace("/", "_") + "_"
                own = [
                    s
                    for s in optimizer.variables
                    if s.path.split("/")[-1].startswith(prefix)
                    and tuple(s.shape) == tuple(variable.shape)
                ]
                slots[variable.path] = {
                    "spec": spec(variable),
                    "devices": len(variable.value.sharding.device_set),
                    "slots": [spec(s) for s in own],
                }
        facts[name] = slots
        np.savez(
            os.path.join(workdir, f"{name}_single.npz"),
            *[np.asarray(w) for w in single.get_weights()],
        )
        np.savez(
            os.path.join(workdir, f"{name}_parallel.npz"),
            *[np.asarray(w) for w in parallel.get_weights()],
        )
    with open(os.path.join(workdir, "facts.json"), "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1])
