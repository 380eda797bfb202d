"""One process of a local multi-process training, for tests/test_multiprocess.py.

    KERAS_BACKEND=B python tests/_multiprocess_worker.py SCENARIO INDEX ADDRESSES OUTDIR

ADDRESSES is comma-separated `127.0.0.1:PORT`s: every worker's (TensorFlow's
TF_CONFIG needs them all) or the coordinator's alone (JAX, torch). Each process
writes its final weights to OUTDIR/<run>_<INDEX>.npz; process 0 (the chief) also
trains the one-process reference on the same global batch and writes
OUTDIR/<run>_reference.npz, so the test compares arrays. A run that fails inside
Keras writes OUTDIR/<run>_<INDEX>.error instead (the test turns it into an
xfail where the failure is a known Keras bug). Every scenario of a backend runs
in one launch: start-up dominates.

Scenarios:
- tf_train: MultiWorkerMirroredStrategy; a custom loop (strategy.run +
  apply_gradients) for AdamP and SGDP, the chief saving a `.keras` checkpoint
  after the first epoch; then `model.fit` as is.
- tf_resume: two fresh workers load the chief's checkpoints inside the scope
  and train the second epoch.
- jax_train: jax.distributed + keras.distribution.DataParallel, `fit` one
  epoch, save on every process, load, `fit` the second epoch.
- torch_train: torch.distributed (gloo) + DistributedDataParallel, a manual
  backward and `optimizer.apply`.
"""

import json
import os
import sys
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

GLOBAL_BATCH = 32
SAMPLES = 128  # 4 steps per epoch
EPOCHS = 2
WORKERS = 2


def optimizers():
    from keras_adamp import SGDP
    from keras_adamp import AdamP

    return {
        "adamp": lambda: AdamP(learning_rate=0.01, weight_decay=0.01),
        "sgdp": lambda: SGDP(
            learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
        ),
    }


def data():
    from _data import digits

    return digits(SAMPLES, flat=True)


def build_model():
    # LayerNorm: its statistics are per example, so two workers and one
    # process compute the same thing (BatchNorm's are per worker). The hidden
    # kernel is scale-invariant: the projection acts on it.
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, use_bias=False),
            keras.layers.LayerNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(10),
        ]
    )


def loss_fn(**kwargs):
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)


def reference(name, epochs=EPOCHS):
    """One process, the whole global batch, `fit`."""
    x, y = data()
    model = build_model()
    model.compile(optimizer=optimizers()[name](), loss=loss_fn())
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def steps(optimizer):
    import keras

    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class Run:
    """Writes this process's results of one run under OUTDIR."""

    def __init__(self, outdir, index):
        self.outdir, self.index = outdir, index

    def weights(self, run, model, **facts):
        import keras

        arrays = [keras.ops.convert_to_numpy(w) for w in model.weights]
        np.savez(os.path.join(self.outdir, f"{run}_{self.index}.npz"), *arrays)
        if facts:
            with open(os.path.join(self.outdir, f"{run}_{self.index}.json"), "w") as f:
                json.dump(facts, f)

    def reference(self, run, model):
        import keras

        arrays = [keras.ops.convert_to_numpy(w) for w in model.weights]
        np.savez(os.path.join(self.outdir, f"{run}_reference.npz"), *arrays)

    def error(self, run, exc):
        with open(os.path.join(self.outdir, f"{run}_{self.index}.error"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def checkpoint(self, name):
        return os.path.join(self.outdir, f"checkpoint_{name}.keras")


# ---------------------------------------------------------------- TensorFlow


def tf_strategy(index, addresses):
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    )
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def tf_dataset(x, y):
    import tensorflow as tf

    options = tf.data.Options()
    # Worker i takes per-replica batches i, i + 2, ...: together they make
    # the global batches, in order.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(GLOBAL_BATCH)
        .with_options(options)
    )


def tf_custom_loop(strategy, model, optimizer, epochs, on_epoch_end=None):
    import tensorflow as tf

    x, y = data()
    per_example = loss_fn(reduction=None)
    dataset = strategy.experimental_distribute_dataset(tf_dataset(x, y))

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

    for epoch in range(epochs):
        for xb, yb in dataset:
            train_step(xb, yb)
        if on_epoch_end:
            on_epoch_end(epoch)


def tf_train(index, addresses, out):
    strategy = tf_strategy(index, addresses)
    assert strategy.num_replicas_in_sync == WORKERS
    for name, make in optimizers().items():
        with strategy.scope():
            model = build_model()
            optimizer = make()
            model.compile(optimizer=optimizer, loss=loss_fn())
            optimizer.build(model.trainable_variables)

        def save_first_epoch(epoch, model=model, name=name):
            # Only the chief writes the checkpoint; reading the mirrored
            # variables is local, so the other worker need not take part.
            if epoch == 0 and index == 0:
                model.save(out.checkpoint(name))

        tf_custom_loop(strategy, model, optimizer, EPOCHS, save_first_epoch)
        out.weights(f"tf_loop_{name}", model, iterations=steps(optimizer))
        if index == 0:
            out.reference(name, reference(name))
    # model.fit as a user would write it; last, so that its failure in Keras
    # (keras-team/keras#20585) leaves the results above in place.
    x, y = data()
    for name, make in optimizers().items():
        with strategy.scope():
            model = build_model()
            model.compile(optimizer=make(), loss=loss_fn())
        try:
            model.fit(tf_dataset(x, y), epochs=EPOCHS, verbose=0)
        except Exception as exc:  # noqa: BLE001 (reported to the test, which decides)
            out.error(f"tf_fit_{name}", exc)
            continue
        out.weights(f"tf_fit_{name}", model, iterations=steps(model.optimizer))


def tf_resume(index, addresses, out):
    import keras

    import keras_adamp  # noqa: F401  (registers AdamP and SGDP for loading)

    strategy = tf_strategy(index, addresses)
    for name in optimizers():
        with strategy.scope():
            model = keras.saving.load_model(out.checkpoint(name))
        optimizer = model.optimizer
        resumed_at = steps(optimizer)
        tf_custom_loop(strategy, model, optimizer, EPOCHS - 1)
        out.weights(
            f"tf_resume_{name}",
            model,
            resumed_at=resumed_at,
            iterations=steps(optimizer),
            optimizer=type(optimizer).__name__,
        )


# ---------------------------------------------------------------- JAX


def jax_train(index, addresses, out):
    import keras

    import keras_adamp  # noqa: F401

    keras.distribution.initialize(addresses[0], WORKERS, index)
    devices = keras.distribution.list_devices()
    assert len(devices) == WORKERS, devices
    x, y = data()
    import tensorflow as tf

    # Every process feeds the same global batches; DataParallel gives each
    # its shard.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    for name, make in optimizers().items():
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
        model = build_model()
        model.compile(optimizer=make(), loss=loss_fn())
        model.fit(dataset, epochs=1, verbose=0)
        # Saving is a collective step (the saver builds a throwaway optimizer
        # whose variable creation every process must join): save everywhere,
        # the chief to the real path.
        path = out.checkpoint(name)
        if index:
            path = path.replace(".keras", f"_{index}.keras")
        model.save(path)
        # Each process loads its own copy: on hosts without a shared disk
        # that is all there is, and the chief's file may not be complete yet
        # when another process gets here. Loading creates variables too: the
        # same seed on every process.
        keras.utils.set_random_seed(0)
        model = keras.saving.load_model(path)
        resumed_at = steps(model.optimizer)
        model.fit(dataset, epochs=EPOCHS, initial_epoch=1, verbose=0)
        out.weights(
            f"jax_fit_{name}",
            model,
            resumed_at=resumed_at,
            iterations=steps(model.optimizer),
            optimizer=type(model.optimizer).__name__,
        )
        keras.distribution.set_distribution(None)
        if index == 0:
            out.reference(name, reference(name))


# ---------------------------------------------------------------- torch


def torch_train(index, addresses, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{addresses[0]}", rank=index, world_size=WORKERS
    )
    try:
        x, y = data()
        local = GLOBAL_BATCH // WORKERS
        per_example = loss_fn(reduction="mean")
        for name, make in optimizers().items():
            model = build_model()
            optimizer = make()
            optimizer.build(model.trainable_variables)
            # DDP averages the gradients over the workers in backward(): each
            # worker's mean over its half is then the global batch's mean.
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            for _ in range(EPOCHS):
                for start in range(0, SAMPLES, GLOBAL_BATCH):
                    lo = start + index * local
                    xb = torch.as_tensor(x[lo : lo + local])
                    yb = torch.as_tensor(y[lo : lo + local])
                    loss = per_example(yb, ddp(xb, training=True))
                    model.zero_grad()
                    loss.backward()
                    grads = [v.value.grad for v in model.trainable_variables]
                    optimizer.apply(grads, model.trainable_variables)
            out.weights(f"torch_ddp_{name}", model, iterations=steps(optimizer))
            if index == 0:
                out.reference(name, reference(name))
    finally:
        dist.destroy_process_group()


SCENARIOS = {
    "tf_train": tf_train,
    "tf_resume": tf_resume,
    "jax_train": jax_train,
    "torch_train": torch_train,
}


def main(argv):
    scenario, index, addresses, outdir = argv
    out = Run(outdir, int(index))
    SCENARIOS[scenario](int(index), addresses.split(","), out)
    if out.index == 0:
        out.reference("initial", build_model())
    print(f"worker {index}: {scenario} done")


if __name__ == "__main__":
    main(sys.argv[1:])
