"""The spherical optimizers next to Adam, AdamW, AdamP, SGD and SGDP.

    python examples/spherical.py --out docs        # writes docs/spherical.png

Trains the BatchNorm ResNet-20 of ``train_resnet.py`` on the same data (the
bundled digits, offline) from the same initial weights with each optimizer,
on a cosine schedule:

* Adam (lr 1e-3), AdamW and AdamP (lr 1e-3, decoupled decay 1e-2, the AdamP
  paper's settings), AdamS and AdamSRT (lr 1e-3, coupled L2 1e-4 as in the
  seed paper, spherical on the kernels ``keras_adamp.normalized_kernels``
  finds: the 21 convolutions, each followed by BatchNorm);
* SGD and SGDP (lr 0.1, Nesterov momentum 0.9, the paper's decay) and SGDMRT
  (lr 0.1, momentum 0.9, coupled L2 1e-4).

and reports, per optimizer, the test accuracy, the mean norm of those
kernels (start and end) and their mean effective step size
``||w_{t+1}/||w_{t+1}|| - w_t/||w_t||||`` (logged by
``keras_adamp.callbacks.ScaleInvariantNormMonitor``), as a table and a PNG.
Runs on any Keras backend (the data are NumPy arrays; resizing them uses
TensorFlow, which keras_adamp installs).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import train_resnet

LABELS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "adamp": "AdamP",
    "adams": "AdamS",
    "adamsrt": "AdamSRT",
    "sgd": "SGD",
    "sgdp": "SGDP",
    "sgdmrt": "SGDMRT",
}
SPHERICAL = {
    "adams": {"learning_rate": 1e-3, "l2": 1e-4},
    "adamsrt": {"learning_rate": 1e-3, "l2": 1e-4},
    "sgdmrt": {"learning_rate": 0.1, "momentum": 0.9, "l2": 1e-4},
}


def make_optimizer(name, total_steps, spherical):
    """`train_resnet`'s optimizers, plus the spherical ones on `spherical`."""
    import keras

    import keras_adamp

    if name not in SPHERICAL:
        return train_resnet.make_optimizer(name, total_steps)
    kwargs = dict(SPHERICAL[name])
    schedule = keras.optimizers.schedules.CosineDecay(
        kwargs.pop("learning_rate"), max(total_steps, 1)
    )
    cls = {
        "adams": keras_adamp.AdamS,
        "adamsrt": keras_adamp.AdamSRT,
        "sgdmrt": keras_adamp.SGDMRT,
    }[name]
    return cls(schedule, spherical=spherical, **kwargs)


def run_all(
    optimizers,
    epochs,
    batch_size=64,
    steps_per_epoch=None,
    dataset="digits",
    model_name="resnet20",
    image_size=None,
    seed=0,
):
    """Trains once per optimizer from the same initial weights."""
    import keras

    import keras_adamp
    from keras_adamp.callbacks import ScaleInvariantNormMonitor

    x_tr, y_tr, x_te, y_te, classes = train_resnet.load_dataset(
        dataset, image_size, seed
    )
    keras.utils.set_random_seed(seed)
    model = train_resnet.build_model(model_name, x_tr.shape[1:], classes)
    initial = model.get_weights()
    spherical = keras_adamp.normalized_kernels(model)
    steps = steps_per_epoch or len(x_tr) // batch_size
    results = {}
    for name in optimizers:
        keras.utils.set_random_seed(seed)  # the same batches for everyone
        model.set_weights(initial)
        model.compile(
            optimizer=make_optimizer(name, steps * epochs, spherical),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        monitor = ScaleInvariantNormMonitor(variables=spherical, every_n_steps=5)
        start = time.time()
        history = model.fit(
            x_tr,
            y_tr,
            batch_size=batch_size,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=(x_te, y_te),
            callbacks=[monitor],
            verbose=0,
        )
        _, accuracy = model.evaluate(x_te, y_te, verbose=0)
        results[name] = {
            "test_accuracy": float(accuracy),
            "initial_norm": monitor.initial_norm,
            "norms": monitor.epochs["norm"],
            "effective_steps": monitor.epochs["effective_step"],
            "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
            "kernels": len(monitor.tracked_paths),
            "seconds": time.time() - start,
        }
        print(
            f"{LABELS[name]:<8} test accuracy {accuracy:.4f} "
            f"({results[name]['seconds']:.0f} s)",
            flush=True,
        )
    return results


def table(results):
    """Accuracy, kernel norm growth, mean effective step over the first third
    of training (later the cosine schedule dominates it)."""
    lines = [
        (
            f"{'optimizer':<9} {'test acc':>8} {'||w|| start':>11} {'||w|| end':>9} "
            f"{'growth':>8} {'eff. step (first third)':>23}"
        )
    ]
    for name, r in results.items():
        steps = r["effective_steps"]
        early = float(np.mean(steps[: max(1, len(steps) // 3)]))
        growth = 100 * (r["norms"][-1] / r["initial_norm"] - 1)
        lines.append(
            f"{LABELS[name]:<9} {r['test_accuracy']:>8.4f} {r['initial_norm']:>11.3f} "
            f"{r['norms'][-1]:>9.3f} {growth:>+7.2f}% {early:>23.2e}"
        )
    return "\n".join(lines)


def plot(results, filename):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "adam": "tab:red",
        "adamw": "tab:orange",
        "adamp": "tab:brown",
        "adams": "tab:green",
        "adamsrt": "tab:olive",
        "sgd": "tab:blue",
        "sgdp": "tab:cyan",
        "sgdmrt": "tab:purple",
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
    for name, r in results.items():
        kw = dict(
            color=colors[name],
            label=LABELS[name],
            lw=1.4,
            ls="-" if name in SPHERICAL else "--",
        )
        axes[0].plot(range(len(r["norms"]) + 1), [r["initial_norm"], *r["norms"]], **kw)
        axes[1].plot(
            range(1, len(r["effective_steps"]) + 1), r["effective_steps"], **kw
        )
        axes[2].plot(range(1, len(r["val_accuracy"]) + 1), r["val_accuracy"], **kw)
    axes[0].set_title("mean ||w|| of the normalized kernels")
    axes[1].set_title("mean effective step size")
    axes[1].set_yscale("log")
    axes[2].set_title("test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="directory for spherical.png")
    p.add_argument(
        "--optimizers",
        default=",".join(LABELS),
        help="comma-separated, from " + ",".join(LABELS),
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--dataset", default="digits", help="digits | cifar10 | synthetic")
    p.add_argument(
        "--model", default="resnet20", choices=["resnet8", "resnet20", "resnet56"]
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    optimizers = args.optimizers.split(",")
    unknown = [o for o in optimizers if o not in LABELS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}")
    results = run_all(
        optimizers,
        args.epochs,
        args.batch_size,
        args.steps_per_epoch,
        args.dataset,
        args.model,
        args.image_size,
        args.seed,
    )
    os.makedirs(args.out, exist_ok=True)
    filename = os.path.join(args.out, "spherical.png")
    plot(results, filename)
    with open(os.path.join(args.out, "spherical_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    print(f"plot: {filename}")
    return results


if __name__ == "__main__":
    main()
