"""Lion with AdamP's projection, `keras_adamp.Projected(Lion(...))`, offline.

    python examples/train_projected.py              # seconds on a CPU
    python examples/train_projected.py --compare    # and bare Lion beside it

Trains a small BatchNorm convolutional net on scikit-learn's bundled 8x8
digits (1437 training, 360 test images; no download) with Keras's Lion
wrapped in ``keras_adamp.Projected``, and prints the test accuracy and the
mean norm of the scale-invariant kernels (those the wrapper's test flags on
one batch, logged by ``keras_adamp.callbacks.ScaleInvariantNormMonitor``)
at the start and after each epoch. With ``--compare`` the bare Lion trains
too, from the same initial weights: its kernels' norm
grows (+32% in the 10 epochs), the wrapped one's stays nearly flat (+0.2%).
Runs on any Keras backend.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras

import keras_adamp


def digits():
    """((x_train, y_train), (x_test, y_test)): images (n, 8, 8, 1) in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")
    y = data.target.astype("int32")
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def small_convnet(seed=0):
    """Three bias-free convolutions, each followed by BatchNorm (their
    kernels are scale-invariant), and a Dense head (it is not)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8, 8, 1))]
    for filters, strides in ((16, 1), (32, 2), (64, 2)):
        layers += [
            keras.layers.Conv2D(filters, 3, strides, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return keras.Sequential(layers)


def train(args, wrapped=True):
    """Trains one model; returns its norm monitor's record and the accuracy."""
    (x, y), (x_test, y_test) = digits()
    model = small_convnet()
    optimizer = keras.optimizers.Lion(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay
    )
    if wrapped:
        optimizer = keras_adamp.Projected(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    monitor = keras_adamp.callbacks.ScaleInvariantNormMonitor(
        data=(x[: args.batch_size], y[: args.batch_size])
    )
    model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        callbacks=[monitor],
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {
        "optimizer": "Projected(Lion)" if wrapped else "Lion",
        "kernels": len(monitor.tracked_paths),
        "initial_norm": float(monitor.initial_norm),
        "norms": [float(n) for n in monitor.epochs["norm"]],
        "test_accuracy": float(accuracy),
    }


def report(r):
    norms = " ".join(f"{n:.3f}" for n in r["norms"])
    growth = 100 * (r["norms"][-1] / r["initial_norm"] - 1)
    print(
        f"{r['optimizer']}: {r['kernels']} scale-invariant kernels, mean norm "
        f"{r['initial_norm']:.3f} -> {norms} ({growth:+.2f}%); "
        f"test accuracy: {r['test_accuracy']:.4f}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--compare", action="store_true", help="train the bare Lion as well")
    args = p.parse_args(argv)
    print(f"backend: {keras.backend.backend()}, Lion lr {args.learning_rate}")
    results = [train(args, wrapped=True)]
    if args.compare:
        results.append(train(args, wrapped=False))
    for r in results:
        report(r)
    return results


if __name__ == "__main__":
    main()
