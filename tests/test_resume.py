"""Resuming without loss: a run interrupted by an exception mid-epoch and
restarted ends where an uninterrupted run ends, through
keras.callbacks.BackupAndRestore and through ModelCheckpoint(.keras) +
load_model + fit(initial_epoch=...). The optimizer state (moments, SGDP's
buffer, the step count AdamP's bias correction uses) must survive."""

import keras
import numpy as np
import pytest
from _data import digits

import keras_adamp  # noqa: F401  (registers the classes for load_model)
from keras_adamp import SGDP
from keras_adamp import AdamP

OPTIMIZERS = {
    "adamp": lambda: AdamP(learning_rate=0.01, weight_decay=0.01),
    "sgdp": lambda: SGDP(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
}
EPOCHS = 3
FIT = dict(batch_size=32, shuffle=False, verbose=0)


def data():
    return digits(128)


def compiled(optimizer_name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, use_bias=False),
            keras.layers.BatchNormalization(),  # its moving stats resume too
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=OPTIMIZERS[optimizer_name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class Interrupt(keras.callbacks.Callback):
    """Raises in the middle of epoch `epoch` (0-based), after batch 1."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
            raise RuntimeError("simulated preemption")


def uninterrupted(optimizer_name, x, y):
    model = compiled(optimizer_name)
    model.fit(x, y, epochs=EPOCHS, **FIT)
    return model


def assert_same_training(resumed, reference):
    assert int(resumed.optimizer.iterations) == int(reference.optimizer.iterations)
    for a, b in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(np.abs(b).max(), 1))
    for a, b in zip(resumed.optimizer.variables, reference.optimizer.variables):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-6,
            atol=1e-9,
        )


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_backup_and_restore_resumes_an_interrupted_run_exactly(
    optimizer_name, tmp_path
):
    x, y = data()
    backup = lambda: keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model = compiled(optimizer_name)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        model.fit(x, y, epochs=EPOCHS, callbacks=[backup(), Interrupt(1)], **FIT)
    assert int(model.optimizer.iterations) == 4 + 2  # one epoch and two batches

    # a restarted job: fresh process state, a model initialised differently
    restarted = compiled(optimizer_name)
    restarted.set_weights([w * 0 for w in restarted.get_weights()])
    restarted.fit(x, y, epochs=EPOCHS, callbacks=[backup()], **FIT)
    assert_same_training(restarted, uninterrupted(optimizer_name, x, y))


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_model_checkpoint_load_model_and_initial_epoch_resume_exactly(
    optimizer_name, tmp_path
):
    x, y = data()
    model = compiled(optimizer_name)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch_{epoch}.keras"))
    with pytest.raises(RuntimeError, match="simulated preemption"):
        model.fit(x, y, epochs=EPOCHS, callbacks=[checkpoint, Interrupt(2)], **FIT)

    resumed = keras.saving.load_model(tmp_path / "epoch_2.keras")
    assert type(resumed.optimizer) is type(model.optimizer)
    assert int(resumed.optimizer.iterations) == 8
    resumed.fit(x, y, epochs=EPOCHS, initial_epoch=2, **FIT)
    assert_same_training(resumed, uninterrupted(optimizer_name, x, y))


def test_resume_check_detects_a_lost_optimizer_state(tmp_path):
    """Guards the tests above: restarting from the weights alone (fresh
    moments, step count 0) does not pass `assert_same_training`."""
    x, y = data()
    model = compiled("adamp")
    model.fit(x, y, epochs=2, **FIT)
    fresh = compiled("adamp")
    fresh.set_weights(model.get_weights())
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.optimizer.iterations.assign(8)  # only the moments are lost
    fresh.fit(x, y, epochs=1, **FIT)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_same_training(fresh, uninterrupted("adamp", x, y))
