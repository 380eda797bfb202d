"""The AdamP paper's Figure 3 in miniature: weight norm and effective step size.

    python examples/norm_growth.py --out docs      # writes docs/norm_growth.png

Trains the same BatchNorm ResNet-20 as ``train_resnet.py`` (same data, same
initial weights, the paper's settings and cosine schedule) with SGD and SGDP,
and with AdamW and AdamP (AdamW is Adam with the same decoupled weight decay as
AdamP, so that the projection is the only difference), and logs with
``keras_adamp.callbacks.ScaleInvariantNormMonitor``:

* the mean L2 norm of the scale-invariant kernels (those the optimizer's test
  flags on one batch), per epoch;
* their mean effective step size ``||w_{t+1}/||w_{t+1}|| - w_t/||w_t||||``;
* the test accuracy.

Prints a table and saves a PNG with the three curves. Needs TensorFlow
(tf.data), like ``train_resnet.py``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import train_resnet

LABELS = {
    "sgd": "SGD",
    "sgdp": "SGDP",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamp": "AdamP",
}


def run_all(optimizers, argv=()):
    """Trains once per optimizer with `train_resnet`'s arguments `argv`."""
    import keras

    results = {}
    for name in optimizers:
        keras.backend.clear_session()
        args = train_resnet.parse_args([*argv, "--optimizer", name])
        print(f"--- {LABELS[name]}")
        r = train_resnet.train(args)
        r.pop("model")
        results[name] = r
    return results


def table(results):
    """Norm growth, mean effective step over the first third of training, accuracy."""
    lines = [
        (
            f"{'optimizer':<9} {'||w|| start':>11} {'||w|| end':>9} {'growth':>8} "
            f"{'eff. step (first third)':>23} {'test acc':>8}"
        )
    ]
    for name, r in results.items():
        steps = r["effective_steps"]
        early = float(np.mean(steps[: max(1, len(steps) // 3)]))
        growth = 100 * (r["norm"] / r["initial_norm"] - 1)
        lines.append(
            f"{LABELS[name]:<9} {r['initial_norm']:>11.3f} {r['norm']:>9.3f} "
            f"{growth:>+7.2f}% {early:>23.2e} {r['test_accuracy']:>8.4f}"
        )
    return "\n".join(lines)


def plot(results, filename):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "sgd": ("tab:blue", "--"),
        "sgdp": ("tab:blue", "-"),
        "adam": ("tab:red", "--"),
        "adamw": ("tab:red", "--"),
        "adamp": ("tab:red", "-"),
    }
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3), dpi=80)
    for name, r in results.items():
        color, line = styles[name]
        kw = dict(color=color, ls=line, label=LABELS[name], lw=1.4)
        epochs = range(len(r["norms"]) + 1)
        axes[0].plot(epochs, [r["initial_norm"], *r["norms"]], **kw)
        axes[1].plot(
            range(1, len(r["effective_steps"]) + 1), r["effective_steps"], **kw
        )
        axes[2].plot(range(1, len(r["val_accuracy"]) + 1), r["val_accuracy"], **kw)
    axes[0].set_title("mean ||w|| of scale-invariant kernels")
    axes[1].set_title("mean effective step size")
    axes[1].set_yscale("log")
    axes[2].set_title("test accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="directory for norm_growth.png")
    p.add_argument(
        "--optimizers",
        default="sgd,sgdp,adamw,adamp",
        help="comma-separated, from " + ",".join(LABELS),
    )
    args, rest = p.parse_known_args(argv)
    optimizers = args.optimizers.split(",")
    unknown = [o for o in optimizers if o not in LABELS]
    if unknown:
        p.error(f"unknown optimizer(s) {unknown}")
    rest = rest or []
    if "--verbose" not in rest:
        rest += ["--verbose", "0"]
    results = run_all(optimizers, rest)
    os.makedirs(args.out, exist_ok=True)
    filename = os.path.join(args.out, "norm_growth.png")
    plot(results, filename)
    print(table(results))
    print(f"plot: {filename}")
    return results


if __name__ == "__main__":
    main()
