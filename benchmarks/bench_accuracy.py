"""Does it help? Test accuracy of AdamP, SGDP, AdamS/AdamSRT, SGDMRT and
Projected(Lion) against their base optimizers on MNIST-1D, with seeds and a
learning-rate search for each optimizer.

MNIST-1D (Greydanus, 2020; the `mnist1d` package) is generated on this machine
by the package's own recipe (`mnist1d.data.make_dataset` with its default
arguments: 4,000 training and 1,000 test signals of 40 samples, 10 classes);
nothing is downloaded. Its paper reports about 32% test accuracy for logistic
regression, 68% for an MLP and 94% for a small CNN.

The protocol, the same for every optimizer:

1. Learning-rate search: one run per rate of the optimizer's grid, trained on
   the training set less a validation split (its last 10%), scored on that
   split. The rate with the best final validation accuracy is chosen (the
   smaller one on a tie).
2. Seeds: runs with seeds 0, 1, ... at the chosen rate, trained on the whole
   training set and scored on the test set. A seed fixes the initial weights,
   the batch order and the augmentation, so both members of a pair start from
   the same weights: the per-seed difference is a paired comparison.

Both members of a pair get the same epochs, batch size, schedule (linear
warm-up then cosine decay to 0), weight decay and augmentation (a random shift
of each signal by up to 3 samples). The weight decay is Keras's decoupled one,
`w <- w - lr * wd * w`, for all but SGDP, whose own rule divides its
`weight_decay` by `1 - momentum` (as the official code does); SGD gets the
decoupled value that SGDP applies, so the two decay alike. "Adam" in the
Adam/AdamS/AdamSRT group is Keras's Adam with that same decoupled decay, that
is AdamW: the group reuses AdamW's runs.

Each seed run records, per epoch, the test accuracy, the training time so far
(compilation timed apart) and, from `keras_adamp.callbacks.ScaleInvariantNormMonitor`
on the kernels that `keras_adamp.normalized_kernels` finds (conv kernels before
BatchNorm, bias-free dense kernels before LayerNorm), their mean norm and
effective step size (the change of `w / ||w||` per step, ~ ||dw|| / ||w|| for
a step orthogonal to `w`).

    python benchmarks/bench_accuracy.py                 # default run (see --help)
    python benchmarks/bench_accuracy.py --all           # every pair, both models
    python benchmarks/bench_accuracy.py --model transformer_ln   # the LayerNorm model
    python benchmarks/bench_accuracy.py --quick --out /tmp/acc   # <= 60 s smoke run
    python benchmarks/bench_accuracy.py --data ~/cifar10   # ResNet-20, CIFAR-10

Writes DIR/results.json, DIR/summary.md (the tables) and one PNG per model
(norms, effective step size, test accuracy against training time) under --out. Needs the `bench` extra:
`pip install '.[bench]'` (mnist1d, matplotlib; tqdm for the progress bar is
optional). Run from the repository root.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

from _common import loadavg
from _common import machine
from _common import select_backend

EPILOG = """\
The default run is the BatchNorm ResNet with AdamW/AdamP and SGD/SGDP.
--all adds the pairs Adam(W)/AdamS/AdamSRT, SGD(momentum)/SGDMRT and, when the
installed keras_adamp has the `Projected` wrapper, Lion/Projected(Lion), and
the LayerNorm patch transformer.

--data DIR trains the 2-D ResNet-20 (BatchNorm) on CIFAR-10 arrays you already
have instead: DIR/cifar10.npz (or DIR itself, a .npz file) with the keys
x_train (N, 32, 32, 3), y_train (N,) or (N, 1), x_test, y_test (uint8 0-255 or
floats); nothing is downloaded. Meant for a GPU.
"""

CIFAR_FILE = "cifar10.npz"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("KERAS_BACKEND", "jax"),
        choices=["tensorflow", "jax", "torch"],
        help="default: $KERAS_BACKEND, else jax (the fastest on a CPU here)",
    )
    parser.add_argument(
        "--no-jit",
        action="store_true",
        help="compile with jit_compile=False (torch always does)",
    )
    parser.add_argument("--out", default="bench_accuracy_out", help="output folder")
    parser.add_argument("--all", action="store_true", help="every pair, both models")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run of the whole pipeline"
    )
    parser.add_argument(
        "--model",
        choices=["resnet1d_bn", "transformer_ln"],
        help="the MNIST-1D model (default resnet1d_bn; --all: both)",
    )
    parser.add_argument("--data", help="folder (or .npz) with CIFAR-10 arrays")
    parser.add_argument("--epochs", type=int, help="default 15")
    parser.add_argument("--seeds", type=int, help="seed runs per optimizer, default 5")
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="default 100: it divides MNIST-1D's 3,600/4,000 training and "
        "400/1,000 evaluation signals, so one shape compiles",
    )
    parser.add_argument(
        "--grid",
        help="comma-separated learning rates for every optimizer of the run "
        "instead of their grids (one rate: no search, e.g. to compare a pair at "
        "the same rate)",
    )
    parser.add_argument(
        "--optimizers",
        help="comma-separated subset of the optimizers, e.g. AdamW,AdamP",
    )
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    select_backend(ARGS.backend)

import keras
import numpy as np
from keras import layers
from keras import ops

import keras_adamp

# ---------------------------------------------------------------- optimizers

ADAM_LRS = (3e-4, 1e-3, 3e-3)
SGD_LRS = (0.03, 0.1, 0.3)
LION_LRS = (3e-5, 1e-4, 3e-4)
ADAM_WD = 1e-2  # decoupled, Keras's `weight_decay`
SGDP_WD = 5e-4  # SGDP's `weight_decay`, which it divides by 1 - momentum
MOMENTUM = 0.9
SGD_WD = SGDP_WD / (1 - MOMENTUM)  # the decoupled decay that SGDP applies
LION_WD = 0.1


def _layouts(model):
    # Each kernel's output channels from its layer: attention and EinsumDense
    # kernels can't be told apart by shape.
    return dict(channel_axes=keras_adamp.channel_axes_for(model))


def _spherical(model):
    return dict(
        spherical=keras_adamp.normalized_kernels(model),
        channel_axes=keras_adamp.normalized_kernel_axes(model),
    )


# name: (grid, factory(learning_rate, model))
OPTIMIZERS = {
    "AdamW": (
        ADAM_LRS,
        lambda lr, m: keras.optimizers.AdamW(lr, weight_decay=ADAM_WD, epsilon=1e-8),
    ),
    "AdamP": (
        ADAM_LRS,
        lambda lr, m: keras_adamp.AdamP(lr, weight_decay=ADAM_WD, **_layouts(m)),
    ),
    "SGD-Nesterov": (
        SGD_LRS,
        lambda lr, m: keras.optimizers.SGD(
            lr, momentum=MOMENTUM, nesterov=True, weight_decay=SGD_WD
        ),
    ),
    "SGDP": (
        SGD_LRS,
        lambda lr, m: keras_adamp.SGDP(
            lr, momentum=MOMENTUM, nesterov=True, weight_decay=SGDP_WD, **_layouts(m)
        ),
    ),
    "AdamS": (
        ADAM_LRS,
        lambda lr, m: keras_adamp.AdamS(lr, weight_decay=ADAM_WD, **_spherical(m)),
    ),
    "AdamSRT": (
        ADAM_LRS,
        lambda lr, m: keras_adamp.AdamSRT(lr, weight_decay=ADAM_WD, **_spherical(m)),
    ),
    "SGD-momentum": (
        SGD_LRS,
        lambda lr, m: keras.optimizers.SGD(lr, momentum=MOMENTUM, weight_decay=SGD_WD),
    ),
    "SGDMRT": (
        SGD_LRS,
        lambda lr, m: keras_adamp.SGDMRT(
            lr, momentum=MOMENTUM, weight_decay=SGD_WD, **_spherical(m)
        ),
    ),
    "Lion": (LION_LRS, lambda lr, m: keras.optimizers.Lion(lr, weight_decay=LION_WD)),
}
# Groups compared with their first member (the baseline).
PAIRS = [
    ("AdamW", "AdamP"),
    ("SGD-Nesterov", "SGDP"),
    ("AdamW", "AdamS", "AdamSRT"),
    ("SGD-momentum", "SGDMRT"),
]
if hasattr(keras_adamp, "Projected"):
    OPTIMIZERS["Projected(Lion)"] = (
        LION_LRS,
        lambda lr, m: keras_adamp.Projected(
            keras.optimizers.Lion(lr, weight_decay=LION_WD), **_layouts(m)
        ),
    )
    PAIRS.append(("Lion", "Projected(Lion)"))
DEFAULT_PAIRS = PAIRS[:2]


def schedule(lr, steps):
    """Linear warm-up over the first 5% of the steps, then cosine to 0."""
    warmup = max(1, steps // 20)
    return keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=lr, warmup_steps=warmup
    )


# -------------------------------------------------------------------- models


class RandomShift(layers.Layer):
    """In training, shifts each signal of a `(batch, length)` input by a random
    whole number of samples in `[-max_shift, max_shift]`, repeating the edge
    values."""

    def __init__(self, max_shift, **kwargs):
        super().__init__(**kwargs)
        self.max_shift = max_shift
        self.seed_generator = keras.random.SeedGenerator()

    def call(self, x, training=False):
        if not training:
            return x
        length = x.shape[1]
        shift = keras.random.uniform(
            (ops.shape(x)[0], 1),
            -self.max_shift - 0.5,
            self.max_shift + 0.5,
            seed=self.seed_generator,
        )
        shift = ops.cast(ops.round(shift), "int32")
        index = ops.clip(
            ops.arange(length, dtype="int32")[None, :] + shift, 0, length - 1
        )
        return ops.take_along_axis(x, index, axis=1)


def resnet1d(length=40, classes=10, widths=(16, 32, 64)):
    """A 1-D ResNet: a Conv1D stem, then one basic block per width (stride 2
    from the second), every Conv1D bias-free and followed by BatchNorm
    (kernels `(k, in, out)`, channel-last, as in a 2-D ResNet)."""

    def conv_bn(x, filters, kernel=3, strides=1, relu=True):
        x = layers.Conv1D(filters, kernel, strides, padding="same", use_bias=False)(x)
        # PyTorch's BatchNorm momentum: the moving statistics settle within
        # the few hundred steps of a run.
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input((length,))
    x = layers.Reshape((length, 1))(RandomShift(3)(inputs))
    x = conv_bn(x, widths[0], kernel=5)
    for i, filters in enumerate(widths):
        strides = 1 if i == 0 else 2
        y = conv_bn(x, filters, strides=strides)
        y = conv_bn(y, filters, relu=False)
        if strides != 1 or x.shape[-1] != filters:
            x = conv_bn(x, filters, kernel=1, strides=strides, relu=False)
        x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x), name="resnet1d_bn")


def patch_transformer(length=40, classes=10, patch=4, dim=64, depth=2, heads=4):
    """A pre-LayerNorm transformer over `length / patch` patches. The patch
    embedding and each MLP's first Dense are bias-free and followed by a
    LayerNorm, so those kernels are scale-invariant (each as a whole)."""
    tokens = length // patch
    inputs = keras.Input((length,))
    x = layers.Reshape((tokens, patch))(RandomShift(3)(inputs))
    x = layers.LayerNormalization()(layers.Dense(dim, use_bias=False)(x))
    # A learned vector per position (a Keras Embedding, whose layout the
    # package knows).
    positions = layers.Lambda(
        lambda t: ops.zeros_like(t[..., 0], dtype="int32") + ops.arange(tokens)
    )(x)
    x = layers.Add()([x, layers.Embedding(tokens, dim)(positions)])
    for _ in range(depth):
        h = layers.LayerNormalization()(x)
        h = layers.MultiHeadAttention(heads, dim // heads)(h, h)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization()(x)
        h = layers.Dense(2 * dim, use_bias=False)(h)
        h = layers.Activation("gelu")(layers.LayerNormalization()(h))
        x = layers.Add()([x, layers.Dense(dim)(h)])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization()(x))
    return keras.Model(inputs, layers.Dense(classes)(x), name="transformer_ln")


class RandomFlipCrop(layers.Layer):
    """In training, flips each `(batch, h, w, c)` image left-right with
    probability 1/2 and crops it at a random offset from the image padded with
    `pad` zeros on each side (the CIFAR augmentation), in `keras.ops` so that
    the model compiles whole (Keras's preprocessing layers turn jit off)."""

    def __init__(self, pad, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad
        self.seed_generator = keras.random.SeedGenerator()

    def _offsets(self, n):
        u = keras.random.uniform(
            (n, 1), -0.5, 2 * self.pad + 0.5, seed=self.seed_generator
        )
        return ops.cast(ops.round(u), "int32")

    def call(self, x, training=False):
        if not training:
            return x
        n, h, w = ops.shape(x)[0], x.shape[1], x.shape[2]
        flip = keras.random.uniform((n, 1, 1, 1), seed=self.seed_generator) < 0.5
        x = ops.where(flip, ops.flip(x, axis=2), x)
        p = self.pad
        x = ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        rows = ops.arange(h, dtype="int32")[None, :] + self._offsets(n)
        x = ops.take_along_axis(x, rows[:, :, None, None], axis=1)
        cols = ops.arange(w, dtype="int32")[None, :] + self._offsets(n)
        return ops.take_along_axis(x, cols[:, None, :, None], axis=2)


def resnet20_cifar(classes=10):
    """He et al.'s CIFAR ResNet-20 (benchmarks/bench_train.py) behind a random
    horizontal flip and a 4-pixel random crop."""
    from bench_train import resnet20

    inputs = keras.Input((32, 32, 3))
    x = RandomFlipCrop(4)(inputs)
    return keras.Model(inputs, resnet20(classes)(x), name="resnet20_bn")


MODELS = {"resnet1d_bn": resnet1d, "transformer_ln": patch_transformer}
QUICK_MODELS = {
    "resnet1d_bn": lambda: resnet1d(widths=(8,)),
    "transformer_ln": lambda: patch_transformer(dim=16, depth=1, heads=2),
}

# ---------------------------------------------------------------------- data


def mnist1d_data():
    """MNIST-1D's standard split, generated locally (no download)."""
    try:
        from mnist1d.data import make_dataset
    except ImportError as error:
        raise SystemExit(
            "bench_accuracy.py needs the mnist1d package: pip install '.[bench]' "
            f"({error})"
        ) from error
    state = np.random.get_state()  # make_dataset seeds NumPy's global RNG
    data = make_dataset()  # default arguments: the published recipe, seed 42
    np.random.set_state(state)
    return (
        data["x"].astype("float32"),
        data["y"].astype("int32"),
        data["x_test"].astype("float32"),
        data["y_test"].astype("int32"),
    )


def cifar10_data(path):
    if os.path.isdir(path):
        path = os.path.join(path, CIFAR_FILE)
    if not os.path.isfile(path):
        raise SystemExit(
            f"--data: no {path}; expected a .npz with x_train, y_train, x_test, "
            "y_test (CIFAR-10 arrays you already have; nothing is downloaded)"
        )
    with np.load(path) as f:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
        if missing:
            raise SystemExit(f"--data: {path} lacks {sorted(missing)}")
        x, y, xt, yt = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x, xt = x.astype("float32") / scale, xt.astype("float32") / scale
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-7
    return (
        (x - mean) / std,
        y.reshape(-1).astype("int32"),
        (xt - mean) / std,
        yt.reshape(-1).astype("int32"),
    )


# ------------------------------------------------------------------ one run


class _Record(keras.callbacks.Callback):
    """Per epoch: training time so far (the evaluation left out) and the
    accuracy on the evaluation arrays (in chunks of one batch: one shape,
    one compiled predict function)."""

    def __init__(self, x_eval, y_eval, chunk):
        super().__init__()
        self.x_eval, self.y_eval, self.chunk = x_eval, y_eval, chunk
        self.train_s, self.acc, self._elapsed = [], [], 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._elapsed += time.perf_counter() - self._t0
        self.train_s.append(self._elapsed)
        hits = 0
        for i in range(0, len(self.x_eval), self.chunk):
            logits = self.model.predict_on_batch(self.x_eval[i : i + self.chunk])
            hits += int(
                np.sum(np.argmax(logits, -1) == self.y_eval[i : i + self.chunk])
            )
        self.acc.append(hits / len(self.y_eval))


def _round(values, digits=5):
    return [float(f"{v:.{digits}g}") for v in values]


class Trainer:
    """Trains one model per run. A compiled model is kept per (optimizer,
    learning rate) and reused by the next run with the same pair: its
    variables (weights, BatchNorm statistics, the augmentation's seed state)
    are set to those of a fresh model built under the run's seed and its
    optimizer's variables to their initial values, so a run equals a fresh
    one without a second compilation. The compilation (one `train_on_batch`,
    its update undone) is timed apart from training."""

    def __init__(self, build, epochs, batch, jit):
        self.build, self.epochs, self.batch, self.jit = build, epochs, batch, jit
        self.cache = {}

    def _compiled(self, opt_name, lr, x, y):
        steps = self.epochs * math.ceil(len(x) / self.batch)  # of the schedule
        key = (opt_name, lr, steps)
        if key in self.cache:
            return self.cache[key] + (0.0,)
        model = self.build()
        optimizer = OPTIMIZERS[opt_name][1](schedule(lr, steps), model)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=self.jit,
        )
        optimizer.build(model.trainable_variables)
        initial = [v.numpy() for v in optimizer.variables]
        t0 = time.perf_counter()
        # One step of `fit` itself: `train_on_batch` compiles another function.
        model.fit(x[: self.batch], y[: self.batch], batch_size=self.batch, verbose=0)
        compile_s = time.perf_counter() - t0
        self.cache[key] = (model, initial)
        return model, initial, compile_s

    def run(self, opt_name, lr, seed, data):
        """One run: returns its record (a JSON-able dict)."""
        x, y, x_eval, y_eval = data
        model, initial, compile_s = self._compiled(opt_name, lr, x, y)
        keras.utils.set_random_seed(seed)
        fresh = self.build()
        for target, source in zip(model.variables, fresh.variables, strict=True):
            target.assign(source)
        for target, value in zip(model.optimizer.variables, initial, strict=True):
            target.assign(value)
        record = _Record(x_eval, y_eval, self.batch)
        monitor = keras_adamp.callbacks.ScaleInvariantNormMonitor(
            variables=keras_adamp.normalized_kernels(model), every_n_steps=10
        )
        keras.utils.set_random_seed(seed)  # the batch order
        t0 = time.perf_counter()
        history = model.fit(
            x,
            y,
            batch_size=self.batch,
            epochs=self.epochs,
            shuffle=True,
            verbose=0,
            callbacks=[record, monitor],
        )
        loss = history.history["loss"]
        return {
            "acc": record.acc[-1],
            "wall_s": round(time.perf_counter() - t0, 2),
            "compile_s": round(compile_s, 2),
            "epochs": {
                "acc": _round(record.acc),
                "train_s": _round(record.train_s),
                "loss": _round(loss),
                "norm": _round(monitor.epochs["norm"]),
                "effective_step": _round(monitor.epochs["effective_step"]),
            },
            "initial_norm": monitor.initial_norm,
            "tracked_kernels": len(monitor.tracked_paths),
            "finite": all(math.isfinite(v) for v in loss),
        }


# ------------------------------------------------------------------ summary

# Two-sided 95% Student t quantiles by degrees of freedom.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31}


def spread(values):
    """mean, sample std, and the half-width of the mean's 95% t-interval."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = T95.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": half, "n": n}


def summarize(model_runs, groups):
    """Per optimizer: accuracy spread over the seeds; per group member: the
    paired per-seed difference to the group's baseline."""
    table = {}
    for name, runs in model_runs.items():
        accs = [r["acc"] for r in runs["seeds"]]
        table[name] = dict(
            spread(accs),
            lr=runs["lr"],
            time_s=statistics.fmean(r["epochs"]["train_s"][-1] for r in runs["seeds"]),
            final_norm=statistics.fmean(r["epochs"]["norm"][-1] for r in runs["seeds"]),
            compile_s=statistics.fmean(
                r["compile_s"] for r in runs["search"] + runs["seeds"] if r["compile_s"]
            ),
        )
    comparisons = []
    for group in groups:
        base = group[0]
        for other in group[1:]:
            a = {r["seed"]: r["acc"] for r in model_runs[base]["seeds"]}
            b = {r["seed"]: r["acc"] for r in model_runs[other]["seeds"]}
            diffs = [b[s] - a[s] for s in sorted(a) if s in b]
            s = spread(diffs)
            inside = not (abs(s["mean"]) > s["ci95"])  # nan -> inside
            comparisons.append(
                dict(s, baseline=base, optimizer=other, diffs=diffs, inside=inside)
            )
    return table, comparisons


def print_table(model_name, table, comparisons):
    print(f"\n{model_name}: test accuracy over seeds (mean ± std)")
    for name, row in table.items():
        print(
            f"  {name:<16} lr {row['lr']:<7g} {100 * row['mean']:6.2f} ± "
            f"{100 * row['std']:.2f} %  (n={row['n']}, {row['time_s']:.1f} s)"
        )
    for c in comparisons:
        verdict = "inside" if c["inside"] else "outside"
        print(
            f"  {c['optimizer']} - {c['baseline']}: {100 * c['mean']:+.2f} ± "
            f"{100 * c['std']:.2f} points (95% CI ±{100 * c['ci95']:.2f}: "
            f"0 is {verdict})"
        )


def markdown(result):
    """The tables of a run's JSON, in Markdown (the docs page quotes them)."""
    lines = []
    groups = result["settings"]["groups"]
    for model_name, res in result["results"].items():
        table, comparisons = summarize(res["runs"], groups)
        lines += [
            f"**{model_name}**",
            "",
            (
                "| optimizer | chosen lr (of the grid) | test accuracy, mean ± std "
                "(n) | final kernel norm | training time per run | compilation |"
            ),
            "|---|---|---|---|---|---|",
        ]
        grids = result["settings"]["grids"]
        for name, row in table.items():
            grid = ", ".join(f"{g:g}" for g in grids[name])
            lines.append(
                f"| {name} | {row['lr']:g} ({grid}) | {100 * row['mean']:.2f} ± "
                f"{100 * row['std']:.2f} % ({row['n']}) | {row['final_norm']:.3g} "
                f"| {row['time_s']:.1f} s | {row['compile_s']:.1f} s |"
            )
        lines += [
            "",
            (
                "| pair | per-seed difference (points) | mean ± std | 95% interval "
                "of the mean | 0 inside? |"
            ),
            "|---|---|---|---|---|",
        ]
        for c in comparisons:
            diffs = ", ".join(f"{100 * d:+.1f}" for d in c["diffs"])
            lines.append(
                f"| {c['optimizer']} − {c['baseline']} | {diffs} | "
                f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f} | "
                f"±{100 * c['ci95']:.2f} | {'yes' if c['inside'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(model_name, model_runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, (name, runs) in enumerate(model_runs.items()):
        seeds = runs["seeds"]
        style = dict(color=f"C{i}", label=f"{name} (lr {runs['lr']:g})")

        def mean_of(key, seeds=seeds):
            return np.mean([r["epochs"][key] for r in seeds], axis=0)

        epochs = np.arange(1, len(seeds[0]["epochs"]["norm"]) + 1)
        initial = np.mean([r["initial_norm"] for r in seeds])
        axes[0].plot(np.r_[0, epochs], np.r_[initial, mean_of("norm")], **style)
        axes[1].plot(epochs, mean_of("effective_step"), **style)
        axes[2].plot(mean_of("train_s"), 100 * mean_of("acc"), **style)
    axes[0].set(xlabel="epoch", ylabel="mean kernel norm ||w||")
    axes[1].set(xlabel="epoch", ylabel="effective step size", yscale="log")
    axes[2].set(xlabel="training time (s)", ylabel="test accuracy (%)")
    lo = min(100 * min(r["acc"] for r in runs["seeds"]) for runs in model_runs.values())
    axes[2].set_ylim(max(0, lo - 15), 100)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model_name}: scale-invariant kernels and accuracy (mean of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ---------------------------------------------------------------------- main


class _Progress:
    """tqdm when installed, else one line per run."""

    def __init__(self, total):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="run") if tqdm else None
        self.total, self.done = total, 0

    def update(self, text):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def plan(args):
    """(models, groups, optimizers, epochs, seeds, grid size, data)."""
    if args.data:
        models = {"resnet20_bn": resnet20_cifar}
        data = cifar10_data(args.data)
    else:
        models = dict(MODELS) if args.all else {"resnet1d_bn": resnet1d}
        if args.model:
            models = {args.model: MODELS[args.model]}
        data = mnist1d_data()
    groups = PAIRS if args.all else DEFAULT_PAIRS
    if args.optimizers:
        wanted = args.optimizers.split(",")
        unknown = set(wanted) - set(OPTIMIZERS)
        if unknown:
            raise SystemExit(
                f"unknown optimizers {sorted(unknown)}; known: {list(OPTIMIZERS)}"
            )
        groups = [g for g in PAIRS if set(g) <= set(wanted)] or [tuple(wanted)]
    names = list(dict.fromkeys(n for g in groups for n in g))
    epochs, seeds, grid = args.epochs or 15, args.seeds or 5, None
    if args.quick:
        # One rate, and smaller models: compilation is most of the time.
        epochs, seeds, grid = args.epochs or 2, args.seeds or 2, 1
        name, build = next(iter(models.items()))
        models = {name: build if args.data else QUICK_MODELS[name]}
        groups, names = groups[:1], list(groups[0])
        x, y, xt, yt = data
        data = (x[:1000], y[:1000], xt[:200], yt[:200])
    return models, groups, names, epochs, seeds, grid, data


def main(args):
    models, groups, names, epochs, seeds, grid, data = plan(args)
    jit = not args.no_jit and keras.backend.backend() != "torch"
    os.makedirs(args.out, exist_ok=True)
    where = machine()
    x, y, x_test, y_test = data
    n_val = len(x) // 10
    search_data = (x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:])
    test_data = (x, y, x_test, y_test)
    if args.grid:
        rates = tuple(float(v) for v in args.grid.split(","))
        grids = {n: rates for n in names}
    else:
        grids = {n: OPTIMIZERS[n][0][:grid] for n in names}
    total = len(models) * sum(len(g) + seeds for g in grids.values())
    print(
        f"{len(models)} model(s) x {len(names)} optimizers, {epochs} epochs, "
        f"batch {args.batch}, {seeds} seeds: {total} runs; backend "
        f"{keras.backend.backend()}, jit_compile={jit}",
        flush=True,
    )
    progress = _Progress(total)
    results = {}
    t_start = time.perf_counter()
    for model_name, build in models.items():
        keras.utils.clear_session()
        trainer = Trainer(build, epochs, args.batch, jit)
        runs = {n: {"search": [], "seeds": []} for n in names}
        # Rates and seeds interleaved across optimizers: a change of the
        # machine's load hits all of them alike.
        for i in range(max(len(g) for g in grids.values())):
            for name in names:
                if i >= len(grids[name]):
                    continue
                lr = grids[name][i]
                run = trainer.run(name, lr, 0, search_data)
                runs[name]["search"].append(dict(run, lr=lr, seed=0))
                progress.update(f"{model_name} {name} lr={lr:g} val {run['acc']:.3f}")
        for name in names:
            best = max(runs[name]["search"], key=lambda r: r["acc"])
            runs[name]["lr"] = best["lr"]
        for seed in range(seeds):
            for name in names:
                lr = runs[name]["lr"]
                run = trainer.run(name, lr, seed, test_data)
                runs[name]["seeds"].append(dict(run, lr=lr, seed=seed))
                progress.update(
                    f"{model_name} {name} seed={seed} test {run['acc']:.3f}"
                )
        table, comparisons = summarize(runs, groups)
        results[model_name] = {"runs": runs, "table": table, "comparisons": comparisons}
    progress.close()
    wall = time.perf_counter() - t_start
    for model_name, res in results.items():
        print_table(model_name, res["table"], res["comparisons"])
        plot(model_name, res["runs"], os.path.join(args.out, f"{model_name}.png"))
    result = {
        "command": "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:]),
        "dataset": "cifar10 (--data)" if args.data else "mnist1d (make_dataset)",
        "settings": {
            "epochs": epochs,
            "batch": args.batch,
            "seeds": seeds,
            "validation": n_val,
            "jit_compile": jit,
            "schedule": "linear warm-up (5% of steps) then cosine to 0",
            "augmentation": "random shift by up to 3 samples"
            if not args.data
            else "random flip, 4-pixel random crop",
            "weight_decay": {
                "adam_decoupled": ADAM_WD,
                "sgdp": SGDP_WD,
                "sgd_decoupled": SGD_WD,
                "lion_decoupled": LION_WD,
            },
            "momentum": MOMENTUM,
            "grids": grids,
            "groups": [list(g) for g in groups],
            "projected_available": hasattr(keras_adamp, "Projected"),
        },
        "wall_s": round(wall, 1),
        "machine": dict(where, loadavg_end=loadavg()),
        "versions": {
            "keras_adamp": keras_adamp.__version__,
            "numpy": np.__version__,
            **_backend_version(),
        },
        "results": results,
    }
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, separators=(",", ":"))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(result))
    print(f"\nwall time {wall:.0f} s; wrote {path}, summary.md and the figures")
    return result


def _backend_version():
    backend = keras.backend.backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    return {backend: __import__(module).__version__}


if __name__ == "__main__":
    main(ARGS)
