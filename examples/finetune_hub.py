"""Fine-tune a keras-hub classifier with AdamP, optionally with LoRA or on a
model-parallel mesh.

    python examples/finetune_hub.py                      # BERT text classifier
    python examples/finetune_hub.py --task image         # ViT image classifier
    python examples/finetune_hub.py --lora 4             # LoRA factors only
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/finetune_hub.py --mesh 2x4       # ModelParallel
    python examples/finetune_hub.py --preset bert_tiny_en_uncased --epochs 2

By default it runs offline: a tiny randomly initialised backbone (BERT or
ViT), on generated token sequences (the class is which band of the
vocabulary a sequence leans on) or on scikit-learn's bundled 8x8 digits
(upsampled to 16x16). `--preset NAME` downloads a real keras-hub preset
instead (its preprocessor then tokenizes generated sentences, or resizes the
digits).

The optimizer groups every variable by the output channels of the layer
that owns it, `channel_axes=keras_adamp.channel_axes_for(model)`: the
attention kernels by their heads, the embeddings by rows, the LoRA factors
by their last axis. `--lora RANK` calls `backbone.enable_lora(RANK)` first
(the backbone's kernels are frozen, the LoRA factors and the head train).
`--mesh BxM` (JAX) trains under `keras.distribution.ModelParallel` on a
(batch, model) mesh, each kernel sharded over `model` on one of its output
axes (the first that divides evenly) and the batch over `batch`.

The last line says the held-out accuracy and the training time.
"""

import argparse
import contextlib
import re
import sys
import time

import keras
import keras_hub
import numpy as np

import keras_adamp

TINY_TEXT = dict(vocabulary_size=128, sequence_length=16)
OPTIMIZERS = ("adamp", "sgdp", "adamw")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["text", "image"], default="text")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamp")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lora", type=int, default=0, metavar="RANK")
    p.add_argument(
        "--mesh", default=None, metavar="BxM", help="JAX ModelParallel mesh, e.g. 2x4"
    )
    p.add_argument("--preset", default=None, help="a keras-hub preset (downloads)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--examples",
        type=int,
        default=None,
        help="examples to use (default: 1024 generated texts, all 1797 digits)",
    )
    p.add_argument("--verbose", type=int, default=1, help="fit's: 1 = progress bar")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.lora < 0:
        p.error("--lora must be a positive rank (0: no LoRA)")
    if args.mesh is not None:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", args.mesh):
            p.error(f"--mesh must read BxM, e.g. 2x4; got {args.mesh!r}")
        args.mesh = tuple(int(n) for n in args.mesh.split("x"))
    if args.learning_rate is None:
        args.learning_rate = {"adamp": 1e-3, "sgdp": 0.05, "adamw": 1e-3}[
            args.optimizer
        ]
        if args.lora:
            args.learning_rate *= 10  # few parameters, b starts at zero
    return args


# -- data -------------------------------------------------------------------

WORDS = {
    "common": [
        "the",
        "a",
        "film",
        "movie",
        "story",
        "plot",
        "was",
        "is",
        "and",
        "it",
        "this",
        "of",
    ],
    0: ["bad", "awful", "boring", "dull", "weak", "poor"],
    1: ["good", "great", "fun", "superb", "strong", "fine"],
}


def text_data(n, rng, vocabulary_size, sequence_length):
    """Token ids: 40% of each sequence drawn from the lower (class 0) or the
    upper (class 1) band of the vocabulary, the rest from all of it; ids 0-3
    are left to padding and special tokens."""
    y = rng.integers(0, 2, size=n)
    shape = (n, sequence_length)
    band = (vocabulary_size - 4) // 2
    marked = 4 + y[:, None] * band + rng.integers(0, band, size=shape)
    ids = np.where(
        rng.random(shape) < 0.4, marked, rng.integers(4, vocabulary_size, size=shape)
    )
    x = {
        "token_ids": ids.astype("int32"),
        "segment_ids": np.zeros(shape, "int32"),
        "padding_mask": np.ones(shape, "bool"),
    }
    return x, y.astype("int32")


def sentences(n, rng):
    """Generated sentences for a preset's tokenizer, and their labels."""
    y = rng.integers(0, 2, size=n)
    texts = []
    for label in y:
        words = [*rng.choice(WORDS["common"], 6), *rng.choice(WORDS[label], 2)]
        rng.shuffle(words)
        texts.append(" ".join(words))
    return np.array(texts), y.astype("int32")


def digits(size):
    """scikit-learn's bundled digits, upsampled to `size` x `size`, [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")
    x = np.repeat(np.repeat(x, size // 8, axis=1), size // 8, axis=2)[..., None]
    return x, data.target.astype("int32")


# -- model ------------------------------------------------------------------


def build_classifier(args):
    keras.utils.set_random_seed(args.seed)
    if args.task == "text":
        if args.preset:
            return keras_hub.models.TextClassifier.from_preset(
                args.preset, num_classes=2
            )
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=TINY_TEXT["vocabulary_size"],
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            intermediate_dim=64,
            max_sequence_length=TINY_TEXT["sequence_length"],
        )
        return keras_hub.models.BertTextClassifier(
            backbone, num_classes=2, preprocessor=None, dropout=0.0
        )
    if args.preset:
        return keras_hub.models.ImageClassifier.from_preset(args.preset, num_classes=10)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 1),
        patch_size=4,
        num_layers=2,
        num_heads=4,
        hidden_dim=32,
        mlp_dim=64,
    )
    return keras_hub.models.ViTImageClassifier(
        backbone, num_classes=10, preprocessor=None
    )


def layout_map_for(model, mesh):
    """A `keras.distribution.LayoutMap` sharding each kernel over the mesh's
    `model` axis on its first output axis that divides evenly (the output
    axes from `channel_axes_for`), the rest replicated."""
    size = dict(zip(mesh.axis_names, mesh.shape))["model"]
    by_key = {"^" + re.escape(v.path) + "$": v for v in model.trainable_variables}
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in keras_adamp.channel_axes_for(model).items():
        shape = tuple(by_key[key].shape)
        spec = [None] * len(shape)
        for axis in axes:
            if shape[axis] % size == 0:
                spec[axis] = "model"
                break
        layout_map[key] = tuple(spec)
    return layout_map


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.task == "text" and args.preset:
        x, y = sentences(args.examples or 1024, rng)
    elif args.task == "text":
        x, y = text_data(args.examples or 1024, rng, **TINY_TEXT)
    else:
        x, y = digits(16)
        x, y = x[: args.examples], y[: args.examples]
        if args.preset:
            x = np.repeat(x, 3, axis=-1) * 255.0
    # Whole batches only: a mesh splits every batch over its `batch` axis.
    batch = args.batch_size
    n_test = max(len(y) // 5 // batch, 1) * batch
    n_train = (len(y) - n_test) // batch * batch
    order = rng.permutation(len(y))
    train, test = order[:n_train], order[n_train : n_train + n_test]

    def take(index):
        if isinstance(x, dict):
            return {k: v[index] for k, v in x.items()}
        return x[index]

    distribution = None
    if args.mesh is not None:
        if keras.backend.backend() != "jax":
            sys.exit("--mesh needs KERAS_BACKEND=jax (keras.distribution)")
        devices = keras.distribution.list_devices()
        needed = args.mesh[0] * args.mesh[1]
        if len(devices) < needed:
            sys.exit(
                f"--mesh {args.mesh[0]}x{args.mesh[1]} needs {needed} devices, "
                f"found {len(devices)}; on a CPU set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
            )
        mesh = keras.distribution.DeviceMesh(
            args.mesh, ["batch", "model"], devices[:needed]
        )
        # Built once to read its variables' paths and output axes.
        layout_map = layout_map_for(build_classifier(args), mesh)
        sharded = sum("model" in layout_map[key].axes for key in layout_map)
        print(f"mesh {mesh.shape}: {sharded} kernels sharded over 'model'")
        keras.backend.clear_session()  # the same layer names again
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )

    scope = distribution.scope() if distribution else contextlib.nullcontext()
    with scope:
        model = build_classifier(args)
        if args.lora:
            model.backbone.enable_lora(args.lora)
        channel_axes = keras_adamp.channel_axes_for(model)
        if args.optimizer == "adamp":
            optimizer = keras_adamp.AdamP(
                learning_rate=args.learning_rate,
                weight_decay=args.weight_decay,
                channel_axes=channel_axes,
            )
        elif args.optimizer == "sgdp":
            optimizer = keras_adamp.SGDP(
                learning_rate=args.learning_rate,
                momentum=0.9,
                nesterov=True,
                weight_decay=args.weight_decay * 1e-2,
                channel_axes=channel_axes,
            )
        else:
            optimizer = keras.optimizers.AdamW(
                learning_rate=args.learning_rate, weight_decay=args.weight_decay
            )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        total = sum(int(np.prod(v.shape)) for v in model.weights)
        print(
            f"{type(model).__name__} on {args.task}: {trainable:,} of {total:,} "
            f"weights trained ({len(channel_axes)} grouped by output channel), "
            f"{args.optimizer} lr {args.learning_rate:g}"
            + (f", LoRA rank {args.lora}" if args.lora else "")
            + (f", mesh {args.mesh[0]}x{args.mesh[1]}" if args.mesh else "")
        )
        start = time.perf_counter()
        model.fit(
            take(train),
            y[train],
            batch_size=args.batch_size,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            verbose=args.verbose,
            shuffle=False,  # already shuffled; keras-hub feeds it as tf.data
        )
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(
            take(test), y[test], batch_size=args.batch_size, verbose=0
        )
    print(
        f"final: {args.task} {args.optimizer} accuracy {accuracy:.4f} on "
        f"{len(test)} held-out examples, trained in {seconds:.1f} s"
    )
    return {"accuracy": float(accuracy), "seconds": seconds, "model": model}


if __name__ == "__main__":
    main()
