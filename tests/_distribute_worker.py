"""Run by tests/test_distribute.py in a fresh process: splits the CPU into two
logical devices (possible only before TensorFlow initialises), then trains the
same LayerNorm model with and without tf.distribute.MirroredStrategy, through
model.fit and through a custom loop (strategy.run + apply_gradients). Prints one
JSON line: {scenario: {"error": max relative weight error, ...}}."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras
import numpy as np
from _data import digits

from keras_adamp import SGDP
from keras_adamp import AdamP

GLOBAL_BATCH = 32
OPTIMIZERS = {
    "adamp": lambda: AdamP(learning_rate=0.01, weight_decay=0.01),
    "sgdp": lambda: SGDP(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
}


def data():
    return digits(256, flat=True)


def build_model():
    # LayerNorm, not BatchNorm: BN statistics are per replica under
    # MirroredStrategy, so a BN model legitimately differs from one device.
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(32, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(10),
        ]
    )


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train_fit(strategy, name, x, y):
    with strategy.scope():
        model = build_model()
        model.compile(optimizer=OPTIMIZERS[name](), loss=LOSS)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
    return model


def train_custom_loop(strategy, name, x, y):
    with strategy.scope():
        model = build_model()
        optimizer = OPTIMIZERS[name]()
        optimizer.build(model.trainable_variables)
    per_example = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(
                per_example(yb, model(xb, training=True)),
                global_batch_size=GLOBAL_BATCH,
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(xb, yb):
        strategy.run(replica_step, args=(xb, yb))

    for _ in range(2):
        for xb, yb in dataset:
            train_step(xb, yb)
    return model


def relative_error(a, b):
    return max(
        float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-30))
        for u, v in zip(a, b)
    )


def main():
    x, y = data()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    results = {"replicas": mirrored.num_replicas_in_sync}
    initial = build_model().get_weights()
    for name in OPTIMIZERS:
        # One reference per optimizer, fit on one device: the custom loop
        # computes the same global-batch mean loss, so it has the same target.
        ref_weights = train_fit(single, name, x, y).get_weights()
        for kind, train in (("fit", train_fit), ("custom_loop", train_custom_loop)):
            distributed = train(mirrored, name, x, y)
            results[f"{kind}_{name}"] = {
                "error": relative_error(distributed.get_weights(), ref_weights),
                # how far training moved the weights: the comparison means
                # something only if this is large
                "moved": max(
                    float(np.max(np.abs(a - b))) for a, b in zip(ref_weights, initial)
                ),
                "iterations": int(distributed.optimizer.iterations.numpy())
                if kind == "fit"
                else None,
            }
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
