"""What AdamP and SGDP share besides the projection: argument checks, the
per-variable static plan made in `build`, and weight decay moved into
`update_step` (it depends on the projection's decision)."""

import dataclasses
import numbers

import keras
from keras import ops

from keras_adamp import layouts
from keras_adamp import projection


def check_range(name, value, low, high=None, high_inclusive=False):
    """Raises ValueError naming `name` unless low <= value < high (or <= high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number. Received: {name}={value!r}")
    upper_ok = high is None or value < high or (high_inclusive and value == high)
    if not (value >= low and upper_ok):  # also rejects NaN
        if high is None:
            bounds = f">= {low}"
        else:
            bounds = f"in [{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must be {bounds}. Received: {name}={value}")
    return float(value)


def unique_name(prefix):
    """`prefix`, then `prefix_1`, `prefix_2`... (reset by `clear_session`)."""
    uid = keras.backend.get_uid(prefix)
    return prefix if uid == 1 else f"{prefix}_{uid - 1}"


def _is_indexed_slices(x):
    """True for a TensorFlow IndexedSlices, without importing TensorFlow.

    A duck test on `.indices`/`.values` is not enough: torch tensors have
    `indices()` and `values()` methods (for sparse tensors).
    """
    return type(x).__name__ == "IndexedSlices" and hasattr(x, "dense_shape")


@dataclasses.dataclass(frozen=True)
class _VariablePlan:
    """Static facts per variable index, decided once in `build`.

    On TensorFlow `update_step` receives the raw tf.Variable, which has no Keras
    path, so everything that depends on the path is decided here.
    """

    layouts: tuple  # layouts.ChannelLayout, or None for rank <= 1
    folds: tuple  # bool: the projection can be folded into the final update


class _Step:
    """What one batched optimizer step holds until every variable's
    `update_step` has run: the deferred assignments and the values shared by
    all variables."""

    def __init__(self):
        self.pending = []  # (layout, channel sums, finish(coef, ratio))
        self.shared = {}

    def finish(self, delta, wd_ratio, eps):
        """Decides the projection of every pending variable (one set of ops
        per dtype of the sums) and runs the deferred assignments."""
        groups = {}
        for entry in self.pending:
            dtype = keras.backend.standardize_dtype(entry[1].dtype)
            groups.setdefault(dtype, []).append(entry)
        for group in groups.values():
            results = projection.coefficients(
                [layout for layout, _, _ in group],
                [sums for _, sums, _ in group],
                delta,
                wd_ratio,
                eps,
            )
            for (_, _, finish), (coef, ratio) in zip(group, results):
                finish(coef, ratio)


def _tf_distributed():
    """True inside a tf.distribute strategy (not the default one)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


class ProjectedOptimizer(keras.optimizers.Optimizer):
    """Base of AdamP and SGDP: not for direct use."""

    _step = None  # a _Step while a batched step is being built

    def __init__(
        self,
        learning_rate,
        epsilon,
        weight_decay,
        delta,
        wd_ratio,
        channel_axes,
        name=None,
        **kwargs,
    ):
        if name is None:
            # Unique per process, as Keras's own optimizers ("adam",
            # "adam_1"): TensorBoard and the LR callbacks log
            # `learning_rate_{name}`, so two AdamP must not share a name.
            name = unique_name(type(self).__name__.lower())
        if isinstance(learning_rate, numbers.Real):
            learning_rate = check_range("learning_rate", learning_rate, 0.0)
        weight_decay = check_range(
            "weight_decay", 0.0 if weight_decay is None else weight_decay, 0.0
        )
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.epsilon = check_range("epsilon", epsilon, 0.0)
        self.delta = check_range("delta", delta, 0.0)
        self.wd_ratio = check_range("wd_ratio", wd_ratio, 0.0, 1.0, True)
        self.channel_axes = layouts.validate_channel_axes(channel_axes)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Warns once, here, about patterns that match no trainable variable
        # (frozen layers: ignored) and groupings only guessed from shapes.
        resolved = tuple(
            layouts.resolve_channel_axes(
                var_list, self.channel_axes, owner=type(self).__name__
            )
        )
        self._plan = _VariablePlan(
            layouts=resolved,
            # Not for rank <= 1 (never projected) nor 16-bit variables (their
            # coefficients are float32; 1 + step * coef would round in 16 bits).
            folds=tuple(
                layout is not None and not projection._is_low_precision(v.dtype)
                for layout, v in zip(resolved, var_list)
            ),
        )

    def _apply_weight_decay(self, variables):
        # Decay is applied in `update_step`: its factor depends on whether the
        # projection fired (wd_ratio) for that variable at that step.
        return

    def _decays(self, variable):
        """Whether `variable` is decayed, read at each step as Keras does (a
        `weight_decay` or `exclude_from_weight_decay` set after `build` is
        honoured from the next traced step on)."""
        return bool(self.weight_decay) and self._use_weight_decay(variable)

    def channel_layout(self, variable):
        """The `layouts.ChannelLayout` used for `variable` (None: never
        projected, rank <= 1 or a bias). Through a `LossScaleOptimizer`:
        `keras_adamp.layouts.channel_layout(optimizer, variable)`.

        Before `build`, the layout `build` will give it (the override, else
        the static rules), resolved for this variable alone.

        Raises:
            ValueError: for a variable the built optimizer was not built on,
                or an override whose axes do not fit the variable.
        """
        path = layouts.variable_path(variable)
        if not self.built:
            return layouts.resolve_channel_axes(
                [variable], self.channel_axes, warn=False
            )[0]
        try:
            index = self._get_variable_index(variable)
        except KeyError:
            raise ValueError(
                f"{type(self).__name__}.channel_layout: '{path}' "
                f"{tuple(variable.shape)} is not one of the "
                f"{len(self._plan.layouts)} variables this optimizer was built on."
            ) from None
        return self._plan.layouts[index]

    def _dense(self, gradient, variable):
        # The cosine needs the whole gradient. On TensorFlow an Embedding's
        # gradient is IndexedSlices: scatter sums repeated indices, as
        # IndexedSlices do. Other sparse gradients (tf.SparseTensor, JAX's
        # BCOO, torch sparse tensors) are densified by the backend.
        if _is_indexed_slices(gradient):
            gradient = ops.scatter(
                ops.expand_dims(gradient.indices, -1),
                gradient.values,
                tuple(variable.shape),
            )
        elif getattr(gradient, "is_sparse", False) is True:
            gradient = gradient.to_dense()  # torch
        else:
            gradient = ops.convert_to_tensor(gradient, sparse=False)
        return ops.cast(gradient, variable.dtype)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Each variable's `update_step` computes its update and its channel
        # sums and defers its final assignment; the projections of all
        # variables are then decided by one set of small ops, instead of ~20
        # per variable (graph size, compile time, kernel launches). Under
        # tf.distribute `update_step` runs in the cross-replica update of
        # each variable, which must assign there: each variable decides alone.
        if keras.backend.backend() == "torch":
            from keras_adamp import _torch

            if _torch.update(self, grads, trainable_variables, learning_rate):
                return
        if _tf_distributed():
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        self._step = _Step()
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            self._step.finish(self.delta, self.wd_ratio, self.epsilon)
        finally:
            self._step = None

    def _per_step(self, key, compute):
        """`compute()`, shared by every variable of one step (learning rate
        and bias corrections are the same for all: computed once, not once
        per variable)."""
        if self._step is None:
            return compute()
        if key not in self._step.shared:
            self._step.shared[key] = compute()
        return self._step.shared[key]

    def _update(
        self, index, variable, gradient, update, lr, step, decay_scale=1.0, store=None
    ):
        """Assigns ``variable <- decayed(variable) - step * projected(update)``
        (and ``store <- projected(update)`` if `store` is given), now or, in a
        batched step, once all variables' projections are decided.

        Where the projected update need not be stored the projection is
        folded into one expression,

            w * d - step * (u - w * c)  ==  w * (d + step * c) - step * u,

        which saves two full-size passes where ops are not fused (not for
        16-bit variables, whose coefficients are float32).
        """
        layout = self._plan.layouts[index]
        if layout is None:  # rank <= 1: never projected
            if store is not None:
                self.assign(store, update)
            w = self._decayed(index, variable, lr, 1.0, decay_scale)
            self.assign(variable, w - step * update)
            return
        fold = store is None and self._plan.folds[index]

        def finish(coef, ratio):
            if fold:
                scale = 1.0 + step * coef
                if self._decays(variable):
                    scale = scale - self._decay_rate(lr, decay_scale) * ratio
                self.assign(
                    variable,
                    projection.per_channel(
                        lambda w, u, s: w * s - step * u,
                        scale,
                        layout,
                        variable,
                        update,
                    ),
                )
                return
            u = projection.remove_radial(variable, update, coef, layout)
            ratio = ops.cast(ratio, u.dtype)
            if store is not None:
                self.assign(store, u)
            w = self._decayed(index, variable, lr, ratio, decay_scale)
            self.assign(variable, w - step * u)

        sums = projection.channel_sums(variable, gradient, update, layout)
        if self._step is not None:
            self._step.pending.append((layout, sums, finish))
            return
        [(coef, ratio)] = projection.coefficients(
            [layout], [sums], self.delta, self.wd_ratio, self.epsilon
        )
        finish(coef, ratio)

    def _decayed(self, index, variable, lr, ratio, scale=1.0):
        """w * (1 - lr * weight_decay * scale * ratio), or w if not decayed."""
        if not self._decays(variable):
            return variable
        rate = self._decay_rate(lr, scale)
        if not (isinstance(ratio, float) and ratio == 1.0):
            rate = rate * ratio
        return variable * (1.0 - rate)

    def _decay_rate(self, lr, scale):
        """lr * weight_decay * scale, once per step and dtype."""
        return self._per_step(
            ("decay", lr.dtype, scale),
            lambda: lr * (self.weight_decay * scale),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "wd_ratio": self.wd_ratio,
                "channel_axes": layouts.channel_axes_config(self.channel_axes),
            }
        )
        return config
