"""Train a BatchNorm ResNet with AdamP or SGDP (or a baseline) in Keras.

    python examples/train_resnet.py                        # ResNet-20, SGDP, digits, offline
    python examples/train_resnet.py --optimizer adamp --dataset cifar10 --epochs 100
    python examples/train_resnet.py --model resnet50 --dataset tfds:imagenette/160px

The default run trains a CIFAR-style ResNet-20 on scikit-learn's bundled digits
(8x8 images upsampled to 16x16), offline (78 s on 2 shared CPU cores at load 0.8-2.0), and
prints the test accuracy and the mean norm of the scale-invariant kernels (the
ones the optimizer's own test flags on one batch).

The distribution strategy is picked automatically: a TPU if one is found
(TPUClusterResolver, a TPU pod included), MultiWorkerMirroredStrategy when
TF_CONFIG names several workers, MirroredStrategy over several GPUs, else the
default strategy; ``--strategy`` forces one. The model and optimizer are built
inside ``strategy.scope()`` and the global batch is the per-replica batch times
the number of replicas. The data pipeline uses tf.data whatever the backend.

Several hosts run the same command, unchanged; the environment tells each
process its place:

    # TensorFlow: one TF_CONFIG per host (index 0 is the chief)
    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        python examples/train_resnet.py
    # JAX: keras.distribution.initialize() reads these, then DataParallel
    KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=host1:12345 \
    KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=0 \
        python examples/train_resnet.py

Keras 3.15's ``fit`` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so that strategy trains with a custom loop here
(`train_custom_loop`); every other case uses ``fit``. Only the chief writes
``--save``/``--logdir`` output (JAX: the others save to a scratch file, since
saving is a collective step there).
"""

import argparse
import os
import sys
import time

# Paper settings (Heo et al., ICLR 2021, appendix E.1): SGD(P) lr 0.1, momentum
# 0.9, Nesterov; Adam(P) lr 1e-3; cosine schedule. SGDP's weight decay 1e-5 is
# divided by (1 - momentum) in the reference, i.e. 1e-4 per unit learning rate:
# the SGD baseline gets that 1e-4 directly (Keras's decoupled decay).
OPTIMIZER_DEFAULTS = {
    "sgdp": {"learning_rate": 0.1, "weight_decay": 1e-5},
    "sgd": {"learning_rate": 0.1, "weight_decay": 1e-4},
    "adamp": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "adamw": {"learning_rate": 1e-3, "weight_decay": 1e-2},
    "adam": {"learning_rate": 1e-3, "weight_decay": 0.0},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="resnet20",
        choices=["resnet8", "resnet20", "resnet56", "resnet50"],
        help="resnet8 is for quick smoke tests",
    )
    p.add_argument("--optimizer", default="sgdp", choices=sorted(OPTIMIZER_DEFAULTS))
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: the paper's, per optimizer)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="decoupled weight decay (default: the paper's, per optimizer)",
    )
    p.add_argument(
        "--dataset", default="digits", help="digits | cifar10 | synthetic | tfds:NAME"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this (default: 16 for digits, "
        "32 for cifar10/synthetic, 224 for tfds with resnet50)",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="per replica; the global batch is this times the replicas",
    )
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="cap the steps per epoch (smoke tests)",
    )
    p.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "tpu", "multi_worker", "mirrored", "default"],
        help="TensorFlow backend; JAX uses keras.distribution "
        "(DataParallel over every device of every process)",
    )
    p.add_argument(
        "--cpu-replicas",
        type=int,
        default=0,
        help="split the CPU into this many logical devices first "
        "(to try MirroredStrategy without GPUs)",
    )
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="mixed_float16 (GPU) or mixed_bfloat16 (TPU)",
    )
    p.add_argument("--jit", action="store_true", help="compile with XLA")
    p.add_argument("--logdir", default=None, help="TensorBoard log directory")
    p.add_argument("--save", default=None, help="save the model to PATH.keras")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1, help="fit's verbosity")
    return p.parse_args(argv)


# -- strategy ---------------------------------------------------------------


def configure_cpu_replicas(n):
    """Splits the CPU into `n` logical devices. Must run before TF initialises."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    )


def find_tpu(resolver_factory=None):
    """A connected TPUClusterResolver, or None when there is no TPU."""
    import tensorflow as tf

    factory = resolver_factory or tf.distribute.cluster_resolver.TPUClusterResolver
    try:
        resolver = factory()
        # Local TPU VMs report an empty master; they list TPU devices.
        if (
            not resolver.master()
            and not os.environ.get("TPU_NAME")
            and not tf.config.list_logical_devices("TPU")
        ):
            return None
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return resolver
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        KeyError,
        tf.errors.NotFoundError,
        tf.errors.UnavailableError,
    ):
        return None


def tf_config_workers(environ=None):
    """How many processes TF_CONFIG's cluster names (0 without TF_CONFIG)."""
    import json

    config = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not config:
        return 0
    cluster = json.loads(config).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def select_strategy(name="auto", resolver_factory=None):
    """TPU (a pod too) -> TPUStrategy; TF_CONFIG with several workers ->
    MultiWorkerMirroredStrategy; several GPUs (or CPU replicas) ->
    MirroredStrategy; else the default strategy. `name` forces one ("tpu"
    fails without a TPU).

    Returns:
        (strategy, kind) with kind in {"tpu", "multi_worker", "mirrored",
        "default"}.
    """
    import tensorflow as tf

    if name in ("auto", "tpu"):
        resolver = find_tpu(resolver_factory)
        if resolver is not None:
            return tf.distribute.TPUStrategy(resolver), "tpu"
        if name == "tpu":
            raise RuntimeError("--strategy tpu: no TPU found")
    if name == "multi_worker" or (name == "auto" and tf_config_workers() > 1):
        # Reads TF_CONFIG; every worker blocks here until all have joined.
        return tf.distribute.MultiWorkerMirroredStrategy(), "multi_worker"
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        if gpus:
            return tf.distribute.MirroredStrategy(), "mirrored"
        # No GPU: mirror over the logical CPUs (see --cpu-replicas).
        devices = [d.name for d in cpus]
        return tf.distribute.MirroredStrategy(devices=devices), "mirrored"
    return tf.distribute.get_strategy(), "default"


JAX_ENVIRONMENT = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
)


def start_jax_distribution(environ=None):
    """JAX backend: joins the other processes when the environment names them
    (keras.distribution.initialize reads KERAS_DISTRIBUTION_JOB_ADDRESSES,
    _NUM_PROCESSES and _PROCESS_ID), then shards each global batch over every
    device of every process with DataParallel.

    Returns:
        (number of devices, this process's index, number of processes).
    """
    import jax
    import keras

    environ = os.environ if environ is None else environ
    if any(name in environ for name in JAX_ENVIRONMENT):
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
    return len(devices), jax.process_index(), jax.process_count()


def is_chief(strategy):
    """TensorFlow: the process that writes files (the chief, or worker 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# -- data -------------------------------------------------------------------


def load_dataset(name, image_size=None, seed=0):
    """(x_train, y_train, x_test, y_test, num_classes), float32 images in [0, 1]
    resized to `image_size` (NumPy), or a tfds pipeline pair for "tfds:NAME"."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images[..., None].astype("float32") / 16.0
        y = digits.target.astype("int32")
        order = rng.permutation(len(x))
        x, y = x[order], y[order]
        split = int(0.8 * len(x))
        size = image_size or 16
        x = tf.image.resize(x, (size, size)).numpy()
        return x[:split], y[:split], x[split:], y[split:], 10
    if name == "cifar10":
        import keras

        (x_tr, y_tr), (x_te, y_te) = keras.datasets.cifar10.load_data()
        size = image_size or 32
        prep = lambda a: (
            a.astype("float32") / 255.0
            if size == 32
            else tf.image.resize(a.astype("float32") / 255.0, (size, size)).numpy()
        )
        return (
            prep(x_tr),
            y_tr[:, 0].astype("int32"),
            prep(x_te),
            y_te[:, 0].astype("int32"),
            10,
        )
    if name == "synthetic":
        size = image_size or 32
        x = rng.random((512, size, size, 3), dtype="float32")
        y = rng.integers(0, 10, 512).astype("int32")
        return x[:384], y[:384], x[384:], y[384:], 10
    if name.startswith("tfds:"):
        return _load_tfds(name[5:], image_size or 224)
    raise ValueError(
        f"unknown dataset {name!r}: digits | cifar10 | synthetic | tfds:NAME"
    )


def _load_tfds(name, size):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    (train, test), info = tfds.load(
        name,
        split=[
            "train",
            "test" if "test" in tfds.builder(name).info.splits else "validation",
        ],
        as_supervised=True,
        with_info=True,
    )

    def prep(image, label):
        image = tf.image.resize(tf.cast(image, "float32") / 255.0, (size, size))
        return image, tf.cast(label, "int32")

    return (
        train.map(prep, num_parallel_calls=tf.data.AUTOTUNE),
        None,
        test.map(prep, num_parallel_calls=tf.data.AUTOTUNE),
        None,
        info.features["label"].num_classes,
    )


def make_pipeline(x, y, batch_size, training, seed=0, drop_remainder=None):
    """tf.data: shuffle (training), batch, prefetch. `x` may be a Dataset.
    Every process builds the same pipeline (same seed, same order of global
    batches); the strategy gives each worker its share."""
    import tensorflow as tf

    ds = x if y is None else tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        # In-memory arrays: shuffle them all; a tfds stream of big images: 1000.
        buffer = 10_000 if y is not None else 1_000
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    # Several workers: worker i takes per-replica batches i, i + n, ... of the
    # same stream (there are no files to split).
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    drop = training if drop_remainder is None else drop_remainder
    return (
        ds.batch(batch_size, drop_remainder=drop)
        .with_options(options)
        .prefetch(tf.data.AUTOTUNE)
    )


# -- model ------------------------------------------------------------------


def cifar_resnet(depth, input_shape, num_classes):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64
    filters, 1x1 conv + BN shortcut where the shape changes. Every conv is
    bias-free and followed by BatchNorm, hence scale-invariant."""
    import keras
    from keras import layers

    if (depth - 2) % 6:
        raise ValueError("depth must be 6n + 2")
    n = (depth - 2) // 6

    def conv_bn(x, filters, stride, kernel=3, name=None):
        x = layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_conv",
        )(x)
        # momentum 0.9: the moving statistics must settle within a few hundred
        # steps on small data sets (Keras's 0.99 leaves them off at test time).
        return layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)

    inputs = keras.Input(input_shape)
    x = layers.ReLU()(conv_bn(inputs, 16, 1, name="stem"))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            y = layers.ReLU()(conv_bn(x, filters, stride, name=f"{name}a"))
            y = conv_bn(y, filters, 1, name=f"{name}b")
            if stride != 1 or x.shape[-1] != filters:
                x = conv_bn(x, filters, stride, kernel=1, name=f"{name}_short")
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def build_model(name, input_shape, num_classes):
    import keras

    if name == "resnet50":
        return keras.applications.ResNet50(
            weights=None,
            input_shape=input_shape,
            classes=num_classes,
            classifier_activation=None,
        )
    return cifar_resnet(int(name[len("resnet") :]), input_shape, num_classes)


def make_optimizer(name, total_steps, learning_rate=None, weight_decay=None):
    """The optimizer with the paper's settings and a cosine schedule."""
    import keras

    import keras_adamp

    defaults = OPTIMIZER_DEFAULTS[name]
    lr = defaults["learning_rate"] if learning_rate is None else learning_rate
    wd = defaults["weight_decay"] if weight_decay is None else weight_decay
    schedule = keras.optimizers.schedules.CosineDecay(lr, max(total_steps, 1))
    if name == "sgdp":
        return keras_adamp.SGDP(schedule, momentum=0.9, nesterov=True, weight_decay=wd)
    if name == "sgd":
        return keras.optimizers.SGD(
            schedule, momentum=0.9, nesterov=True, weight_decay=wd or None
        )
    if name == "adamp":
        return keras_adamp.AdamP(schedule, weight_decay=wd)
    if name == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=wd, epsilon=1e-8)
    return keras.optimizers.Adam(schedule, epsilon=1e-8, weight_decay=wd or None)


# -- training -----------------------------------------------------------------


def train_custom_loop(
    model,
    strategy,
    train_ds,
    test_ds,
    global_batch,
    epochs,
    steps,
    callbacks,
    verbose=1,
):
    """What `fit` and `evaluate` do, with strategy.run: Keras 3.15's `fit`
    fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), with
    its own optimizers too. Returns (History, a function giving the test
    loss and accuracy)."""
    import keras
    import tensorflow as tf

    per_example = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    optimizer = model.optimizer

    def replica_train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            # Each replica's share of the global-batch mean: the all-reduced
            # gradient is then the global batch's.
            loss = tf.nn.compute_average_loss(
                per_example(y, logits), global_batch_size=global_batch
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            # A LossScaleOptimizer (--mixed-precision) unscales what it gets.
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def replica_test_step(x, y):
        logits = model(x, training=False)
        correct = tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), "float32"
        )
        return (
            tf.reduce_sum(per_example(y, logits)),
            tf.reduce_sum(correct),
            tf.cast(tf.size(y), "float32"),
        )

    @tf.function
    def train_step(iterator):
        loss = strategy.run(replica_train_step, args=next(iterator))
        return strategy.reduce("SUM", loss, axis=None)

    @tf.function
    def test_step(x, y):
        sums = strategy.run(replica_test_step, args=(x, y))
        return [strategy.reduce("SUM", v, axis=None) for v in sums]

    def evaluate():
        total = tf.zeros(3)
        for x, y in strategy.experimental_distribute_dataset(test_ds):
            total += tf.stack(test_step(x, y))
        loss, correct, count = total.numpy()
        return float(loss / count), float(correct / count)

    history = keras.callbacks.History()
    callbacks = keras.callbacks.CallbackList(
        [*callbacks, history],
        add_progbar=verbose > 0,
        model=model,
        epochs=epochs,
        steps=steps,
        verbose=verbose,
    )
    iterator = iter(strategy.experimental_distribute_dataset(train_ds.repeat()))
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        total = 0.0
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            loss = float(train_step(iterator))
            total += loss
            callbacks.on_train_batch_end(step, {"loss": loss})
        val_loss, val_accuracy = evaluate()
        callbacks.on_epoch_end(
            epoch,
            {"loss": total / steps, "val_loss": val_loss, "val_accuracy": val_accuracy},
        )
    callbacks.on_train_end()
    return history, evaluate


def save_model(model, path, chief):
    """The chief writes `path`; the other processes save to a scratch file
    (with keras.distribution on JAX, saving is a step every process joins:
    the chief alone would hang)."""
    import shutil
    import tempfile

    if chief:
        model.save(path)
        return
    scratch = tempfile.mkdtemp()
    try:
        model.save(os.path.join(scratch, os.path.basename(path)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def train(args, extra_callbacks=()):
    """Trains as `args` says. Returns a dict of results (see the end)."""
    import keras
    import numpy as np

    from keras_adamp.callbacks import ScaleInvariantNormMonitor

    processes, chief = 1, True
    if keras.backend.backend() == "jax":
        # Before any JAX computation: joins the other processes, if any.
        import tensorflow as tf

        replicas, index, processes = start_jax_distribution()
        strategy, chief = tf.distribute.get_strategy(), index == 0
        kind = "data_parallel" if replicas > 1 else "default"
    else:
        strategy, kind = select_strategy(args.strategy)
        replicas = strategy.num_replicas_in_sync
        chief = is_chief(strategy)
        if kind == "multi_worker":
            processes = tf_config_workers() or 1
    keras.utils.set_random_seed(args.seed)  # the same on every process
    global_batch = args.batch_size * replicas
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(
            "mixed_bfloat16" if kind == "tpu" else "mixed_float16"
        )

    x_tr, y_tr, x_te, y_te, num_classes = load_dataset(
        args.dataset, args.image_size, args.seed
    )
    train_ds = make_pipeline(x_tr, y_tr, global_batch, True, args.seed)
    # A sharded batch must split evenly over the devices of several processes.
    test_ds = make_pipeline(
        x_te,
        y_te,
        global_batch,
        False,
        drop_remainder=kind == "data_parallel" and processes > 1,
    )
    if y_tr is not None:
        steps = len(x_tr) // global_batch
        input_shape = x_tr.shape[1:]
        probe = (x_tr[:global_batch], y_tr[:global_batch])
    else:  # tfds
        probe = next(iter(train_ds.take(1)))
        probe = (probe[0].numpy(), probe[1].numpy())
        input_shape = probe[0].shape[1:]
        steps = int(train_ds.cardinality())
        if steps <= 0 and not args.steps_per_epoch:
            raise ValueError(f"{args.dataset}: unknown size, pass --steps-per-epoch")
    if args.steps_per_epoch:
        steps = min(steps, args.steps_per_epoch) if steps > 0 else args.steps_per_epoch
        train_ds = train_ds.repeat()
    workers = f", {processes} processes" if processes > 1 else ""
    print(
        f"strategy: {kind} ({replicas} replica(s){workers}), global batch "
        f"{global_batch}, {steps} steps/epoch, {args.epochs} epochs, {args.optimizer}, "
        f"{args.model} on {args.dataset} {tuple(input_shape)}"
    )

    with strategy.scope():
        model = build_model(args.model, tuple(input_shape), num_classes)
        optimizer = make_optimizer(
            args.optimizer, steps * args.epochs, args.learning_rate, args.weight_decay
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=args.jit,
        )
        if kind == "multi_worker":
            optimizer.build(model.trainable_variables)
    # The kernels the optimizer's own test flags as scale-invariant on one batch.
    monitor = ScaleInvariantNormMonitor(data=probe, every_n_steps=10)
    callbacks = [monitor, *extra_callbacks]
    if args.logdir and chief:
        callbacks.append(keras.callbacks.TensorBoard(args.logdir))
    start = time.time()
    if kind == "multi_worker":
        history, evaluate = train_custom_loop(
            model,
            strategy,
            train_ds,
            test_ds,
            global_batch,
            args.epochs,
            steps,
            callbacks,
            verbose=args.verbose if chief else 0,
        )
        seconds = time.time() - start
        loss, accuracy = evaluate()
    else:
        history = model.fit(
            train_ds,
            epochs=args.epochs,
            steps_per_epoch=steps,
            validation_data=test_ds,
            callbacks=callbacks,
            verbose=args.verbose if chief else 0,
            shuffle=False,  # tf.data shuffles
        )
        seconds = time.time() - start
        loss, accuracy = model.evaluate(test_ds, verbose=0)
    if args.save:
        save_model(model, args.save, chief)
    results = {
        "optimizer": args.optimizer,
        "strategy": kind,
        "replicas": replicas,
        "processes": processes,
        "chief": chief,
        "test_accuracy": float(accuracy),
        "test_loss": float(loss),
        "initial_norm": monitor.initial_norm,
        "norm": monitor.epochs["norm"][-1],
        "norms": monitor.epochs["norm"],
        "effective_steps": monitor.epochs["effective_step"],
        "val_accuracy": [float(a) for a in history.history.get("val_accuracy", [])],
        "scale_invariant_kernels": len(monitor.tracked_paths),
        "kernels": sum(len(v.shape) >= 2 for v in model.trainable_variables),
        "fit_seconds": seconds,
        "model": model,
    }
    assert np.isfinite(results["norm"])
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_replicas:
        configure_cpu_replicas(args.cpu_replicas)
    r = train(args)
    print(f"test accuracy: {r['test_accuracy']:.4f}")
    print(
        f"mean norm of the scale-invariant kernels: {r['initial_norm']:.3f} -> "
        f"{r['norm']:.3f} ({r['scale_invariant_kernels']} of {r['kernels']} kernels "
        f"flagged by the optimizer's test)"
    )
    print(f"training time: {r['fit_seconds']:.1f} s")
    if args.save and r["chief"]:
        print(f"saved: {args.save}")
    return r


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
