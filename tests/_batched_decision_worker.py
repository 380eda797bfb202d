"""Run by tests/test_distribute_batched.py in a fresh process (the CPU can be
split into two logical devices only before TensorFlow initialises): a custom
loop under MirroredStrategy over the two, with `projection.coefficients`
counted while the step is traced. Prints one JSON line: per optimizer, the
number of variables of each call, the replicas, and the error against the
same steps on one device."""

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

import keras_adamp
from keras_adamp import projection

BATCH = 16
OPTIMIZERS = {
    "adamp": lambda: keras_adamp.AdamP(learning_rate=0.01, weight_decay=0.01),
    "sgdp": lambda: keras_adamp.SGDP(learning_rate=0.05, momentum=0.9),
    "adamsrt": lambda: keras_adamp.AdamSRT(
        learning_rate=0.01, spherical=lambda v: tuple(v.shape) == (8, 8)
    ),
}
CALLS = []
_coefficients = projection.coefficients


def counted(layouts, sums, *args, **kwargs):
    CALLS.append(len(layouts))
    return _coefficients(layouts, sums, *args, **kwargs)


projection.coefficients = counted


def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(8, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(8, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )


def train(strategy, name, x, y):
    with strategy.scope():
        model = build_model()
        optimizer = OPTIMIZERS[name]()
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(
                loss_fn(yb, model(xb, training=True)), global_batch_size=BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def step(xb, yb):
        strategy.run(replica_step, args=(xb, yb))

    del CALLS[:]
    for xb, yb in dataset:
        step(xb, yb)
    return model.get_weights(), list(CALLS)


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.integers(0, 3, size=64)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    results = {"replicas": mirrored.num_replicas_in_sync}
    for name in OPTIMIZERS:
        reference, _ = train(single, name, x, y)
        weights, calls = train(mirrored, name, x, y)
        results[name] = {
            "calls": calls,
            "error": max(
                float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
                for a, b in zip(weights, reference)
            ),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
