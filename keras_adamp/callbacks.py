"""A callback that logs the two curves of the AdamP paper's Figure 3.

For scale-invariant kernels (weights followed by BatchNorm or LayerNorm), what
matters is the direction ``w / ||w||``. :class:`ScaleInvariantNormMonitor` logs

* ``scale_invariant_norm``: the mean L2 norm ``||w||`` of the tracked kernels at
  the end of each epoch (momentum SGD and Adam make it grow; SGDP and AdamP
  keep it nearly flat);
* ``scale_invariant_effective_step``: their mean effective step size
  ``|| w_{t+1}/||w_{t+1}|| - w_t/||w_t|| ||``, the angular speed on the sphere
  (it shrinks as ``||w||`` grows), averaged over the steps sampled in the epoch.

Both go into the ``logs`` dict, hence into ``model.fit``'s ``History``, and into
TensorBoard when the monitor comes *before* ``keras.callbacks.TensorBoard`` in
the ``callbacks`` list (Keras passes one logs dict along the list). Written in
``keras.ops``: works on the TensorFlow, JAX and PyTorch backends.
"""

import re

import keras
import numpy as np
from keras import ops


class ScaleInvariantNormMonitor(keras.callbacks.Callback):
    """Logs the norm and effective step size of scale-invariant kernels.

    Which kernels are tracked:

    * ``variables`` given: those (a list of variables, or a regular expression
      searched in ``variable.path``);
    * else ``data=(x, y)`` given: the variables that the optimizer's own test
      flags as scale-invariant on the gradients of that batch, at the start of
      training (:func:`keras_adamp.diagnostics.scale_invariance_report`, with
      the optimizer's layouts and, under ``mixed_float16``, its loss scale:
      a gradient that float16 would flush to 0 is not taken for invariance);
    * else: every trainable variable of rank >= 2 (kernels not followed by a
      normalisation layer included).

    Args:
        data: One batch ``(x, y)`` for the detection (see above).
        variables: Variables, or a regex on their paths, to track.
        every_n_steps: The effective step size is measured on the training
            steps whose index in the epoch is a multiple of this (the first
            step of each epoch always); those steps' ``logs`` also receive both
            values (TensorBoard writes them with ``update_freq="batch"`` or an
            int). Each measurement copies the tracked kernels once (and, on JAX,
            syncs the model state), so a small value costs time. With
            ``steps_per_execution > 1`` one "step" spans that many updates.
        prefix: Prefix of the logged names.

    Attributes:
        tracked_paths: Paths of the tracked variables (set at train begin).
        initial_norm: Mean norm before training.
        epochs: Per-epoch records, a dict of lists: ``"norm"``,
            ``"effective_step"``.
    """

    def __init__(
        self, data=None, variables=None, every_n_steps=10, prefix="scale_invariant_"
    ):
        super().__init__()
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                "`every_n_steps` must be a positive int or None. Received: "
                f"every_n_steps={every_n_steps!r}"
            )
        self.data = data
        self.variables = variables
        self.every_n_steps = every_n_steps or 0
        self.prefix = prefix
        self.tracked_paths = []
        self.initial_norm = None
        self.epochs = {"norm": [], "effective_step": []}
        self._tracked = []
        self._before = None
        self._steps = []

    # -- which variables -------------------------------------------------
    def _select(self):
        trainable = list(self.model.trainable_variables)
        if self.variables is not None:
            if isinstance(self.variables, str):
                pattern = re.compile(self.variables)
                chosen = [v for v in trainable if pattern.search(v.path)]
            else:
                chosen = list(self.variables)
        elif self.data is not None:
            from keras_adamp import diagnostics

            x, y = self.data[0], self.data[1]
            rows = diagnostics.scale_invariance_report(self.model, x, y)
            flagged = {r.path for r in rows if r.scale_invariant}
            chosen = [v for v in trainable if v.path in flagged]
        else:
            chosen = [v for v in trainable if len(v.shape) >= 2]
        if not chosen:
            raise ValueError(
                "ScaleInvariantNormMonitor found no variable to track "
                f"(variables={self.variables!r}, data given: "
                f"{self.data is not None})."
            )
        return chosen

    # -- measurements (keras.ops, any backend) ----------------------------
    def _sync(self):
        # JAX keeps the training state outside the variables between syncs.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _snapshot(self):
        return [ops.copy(v.value) for v in self._tracked]

    @staticmethod
    def _norm(x):
        x = ops.cast(x, "float32")
        return ops.sqrt(ops.sum(ops.square(x)))

    def _mean_norm(self, values):
        return float(np.mean([ops.convert_to_numpy(self._norm(v)) for v in values]))

    def _mean_effective_step(self, before, after):
        steps = []
        for w0, w1 in zip(before, after):
            w0 = ops.cast(w0, "float32")
            w1 = ops.cast(w1, "float32")
            d = w1 / (self._norm(w1) + 1e-12) - w0 / (self._norm(w0) + 1e-12)
            steps.append(ops.convert_to_numpy(self._norm(d)))
        return float(np.mean(steps))

    # -- callback hooks ----------------------------------------------------
    def on_train_begin(self, logs=None):
        self._sync()
        self._tracked = self._select()
        self.tracked_paths = [v.path for v in self._tracked]
        self.initial_norm = self._mean_norm(self._snapshot())

    def on_epoch_begin(self, epoch, logs=None):
        self._steps = []

    def _sampled(self, batch):
        return batch == 0 or (self.every_n_steps and batch % self.every_n_steps == 0)

    def on_train_batch_begin(self, batch, logs=None):
        if self._sampled(batch):
            self._sync()
            self._before = self._snapshot()

    def on_train_batch_end(self, batch, logs=None):
        if self._before is None:
            return
        self._sync()
        after = self._snapshot()
        step = self._mean_effective_step(self._before, after)
        self._before = None
        self._steps.append(step)
        if isinstance(logs, dict) and self.every_n_steps:
            logs[self.prefix + "effective_step"] = step
            logs[self.prefix + "norm"] = self._mean_norm(after)

    def on_epoch_end(self, epoch, logs=None):
        norm = self._mean_norm(self._snapshot())
        step = float(np.mean(self._steps)) if self._steps else float("nan")
        self.epochs["norm"].append(norm)
        self.epochs["effective_step"].append(step)
        if logs is not None:
            logs[self.prefix + "norm"] = norm
            logs[self.prefix + "effective_step"] = step
