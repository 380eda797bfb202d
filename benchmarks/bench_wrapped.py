"""Every Keras optimizer with and without `keras_adamp.Projected`: the
scale-invariant kernels' norm growth, the accuracy, and the step time.

A small BatchNorm ResNet (a stem and three residual blocks; every
convolution bias-free and followed by BatchNorm, so each of its kernels is
scale-invariant; a Dense head) trains on scikit-learn's bundled 8x8 digits
(1437 training and 360 test images, offline) with each optimizer Keras
ships, once bare and once wrapped, from the same initial weights on the
same batches. The two copies train in turn, one epoch each, so that load
from other processes falls on both alike; the first epoch (trace and
compile) is left out of the step time. Recorded per optimizer:

* ``growth``: the mean over the convolution kernels of ``||w_T|| / ||w_0||``;
* ``accuracy``: on the 360 test images after the last epoch;
* ``step_ms`` and ``ratio``: the median epoch time per step, and wrapped
  over bare.

    OMP_NUM_THREADS=1 KERAS_BACKEND=torch python benchmarks/bench_wrapped.py \
        --json docs/perf_results/wrapped_digits_torch_cpu.json
    python benchmarks/bench_wrapped.py --optimizers Adam,SGD --epochs 3

On a shared 2-core CPU, torch with one thread (OMP_NUM_THREADS=1) runs this
small net several times faster than with two; under JAX or TensorFlow each
model's first epoch compiles for 15 s and more.

Run from the repository root (or with keras_adamp importable).
"""

import argparse
import os
import statistics
import sys
import time

from _common import loadavg
from _common import machine
from _common import select_backend
from _common import write_json

# $KERAS_BACKEND's backend (no flag of its own; without it, TensorFlow).
select_backend(os.environ.get("KERAS_BACKEND", "tensorflow"))

import keras
import numpy as np

import keras_adamp

# Each optimizer at a learning rate usual for it on a small BatchNorm net,
# with its Keras defaults otherwise (weight decay: None, or 0.004 for AdamW
# and Muon); SGD and RMSprop with momentum 0.9, as they are used.
OPTIMIZERS = {
    "Adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "Adafactor": lambda: keras.optimizers.Adafactor(0.01),
    "Adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "Adam": lambda: keras.optimizers.Adam(1e-3),
    "AdamW": lambda: keras.optimizers.AdamW(1e-3),
    "Adamax": lambda: keras.optimizers.Adamax(2e-3),
    "Ftrl": lambda: keras.optimizers.Ftrl(0.05),
    "Lamb": lambda: keras.optimizers.Lamb(1e-2),
    "Lion": lambda: keras.optimizers.Lion(3e-4),
    "Muon": lambda: keras.optimizers.Muon(1e-3),
    "Nadam": lambda: keras.optimizers.Nadam(1e-3),
    "RMSprop": lambda: keras.optimizers.RMSprop(1e-3, momentum=0.9),
    "SGD": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "ScheduleFreeAdamW": lambda: keras.optimizers.ScheduleFreeAdamW(2.5e-3),
}
# Those whose step carries past gradients (a first moment, momentum, the
# schedule-free average): where the papers' argument says the norm grows.
MOMENTUM_BASED = {
    "Adam",
    "AdamW",
    "Adamax",
    "Lamb",
    "Lion",
    "Muon",
    "Nadam",
    "RMSprop",
    "SGD",
    "ScheduleFreeAdamW",
}


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")
    y = data.target.astype("int32")
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def resnet(seed=0, width=16):
    """Stem, three residual blocks (the last two downsampling, with a 1x1
    projection shortcut), global pooling, Dense head."""
    keras.utils.set_random_seed(seed)

    def conv_bn(x, filters, kernel, strides=1):
        x = keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=False
        )(x)
        # Momentum 0.9: the moving statistics follow a short training.
        return keras.layers.BatchNormalization(momentum=0.9)(x)

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.ReLU()(conv_bn(inputs, width, 3))
    for filters, strides in ((width, 1), (2 * width, 2), (4 * width, 2)):
        y = keras.layers.ReLU()(conv_bn(x, filters, 3, strides))
        y = conv_bn(y, filters, 3)
        if strides != 1:
            x = conv_bn(x, filters, 1, strides)
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def kernel_norms(model):
    return np.array(
        [
            float(np.linalg.norm(keras.ops.convert_to_numpy(layer.kernel)))
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]
    )


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t0)


def compare(name, data, epochs, batch):
    """Trains the bare and the wrapped optimizer in turn, one epoch each."""
    (x, y), (x_test, y_test) = data
    runs = {}
    for kind in ("bare", "wrapped"):
        model = resnet()
        optimizer = OPTIMIZERS[name]()
        if kind == "wrapped":
            optimizer = keras_adamp.Projected(optimizer)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        runs[kind] = (model, kernel_norms(model), EpochTimer())
    steps = -(-len(x) // batch)
    for epoch in range(epochs):
        for kind, (model, _, timer) in runs.items():
            # The same shuffled order for both copies.
            order = np.random.default_rng(epoch).permutation(len(x))
            model.fit(
                x[order],
                y[order],
                batch_size=batch,
                epochs=epoch + 1,
                initial_epoch=epoch,
                shuffle=False,
                verbose=0,
                callbacks=[timer],
            )
    result = {"momentum_based": name in MOMENTUM_BASED}
    for kind, (model, start, timer) in runs.items():
        norms = kernel_norms(model)
        _, accuracy = model.evaluate(x_test, y_test, batch_size=360, verbose=0)
        finite = bool(np.all(np.isfinite(norms)))
        result[kind] = {
            "growth": float(np.mean(norms / start)) if finite else None,
            "accuracy": float(accuracy),
            "step_ms": 1e3 * statistics.median(timer.seconds[1:]) / steps,
            "epoch_seconds": timer.seconds,
        }
    result["ratio"] = result["wrapped"]["step_ms"] / result["bare"]["step_ms"]
    return result


def table(results):
    lines = [
        "| optimizer | momentum-based | norm growth, bare | wrapped "
        + "| accuracy, bare | wrapped | step time, wrapped / bare |",
        "|---|---|---|---|---|---|---|",
    ]

    def growth(value):
        return "diverged" if value is None else f"{value:.3f}"

    for name, r in results.items():
        lines.append(
            f"| {name} | {'yes' if r['momentum_based'] else 'no'} "
            f"| {growth(r['bare']['growth'])} | {growth(r['wrapped']['growth'])} "
            f"| {r['bare']['accuracy']:.3f} | {r['wrapped']['accuracy']:.3f} "
            f"| {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; known: {list(OPTIMIZERS)}")
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch compiles)")
    data = digits()
    where = machine()  # load average at the start
    t0 = time.perf_counter()
    results = {}
    for name in names:
        results[name] = compare(name, data, args.epochs, args.batch)
        r = results[name]
        print(
            f"{name}: growth {r['bare']['growth']} -> {r['wrapped']['growth']}, "
            f"accuracy {r['bare']['accuracy']:.3f} -> "
            f"{r['wrapped']['accuracy']:.3f}, step ratio {r['ratio']:.2f}",
            flush=True,
        )
    print(table(results))
    record = {
        "command": "python benchmarks/bench_wrapped.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        # Keras, the backend, the CPU, the keras_adamp commit, the load.
        "machine": dict(where, loadavg_end=loadavg()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "wall_seconds": time.perf_counter() - t0,
        "epochs": args.epochs,
        "batch": args.batch,
        "results": results,
    }
    write_json(args.json, record)
    return results


if __name__ == "__main__":
    main()
