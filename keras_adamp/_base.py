"""The step machinery the five optimizers share: argument checks, unique
names, dense gradients, the per-variable static plan made in `build`, the
values computed once per step, and the step itself.

A step runs in three phases over the variables:

1. per variable, what the projection's decision needs of it, its channel
   sums (`_sums`), and nothing is assigned;
2. the decisions of all variables, in one set of small ops
   (:func:`keras_adamp.projection.coefficients`);
3. per variable, its update computed again from the optimizer's state and
   the gradient, and assigned (`_assign`).

Nothing of the size of a variable is held from 1 to 3: what 3 needs again
is cheap elementwise work (XLA fuses it into the assignment). Under
tf.distribute, 1 and 2 run in replica context (after the gradients are
all-reduced every replica holds the same gradients and weights) and 3 in
each variable's cross-replica update. On torch an optimizer's step may
instead be run by keras_adamp/_torch.py, whose step the optimizer names
(`StepOptimizer._torch_step`).
"""

import dataclasses
import math
import numbers

import keras
from keras import ops

from keras_adamp import layouts
from keras_adamp import projection

if keras.backend.backend() == "torch":
    from keras_adamp import _torch
else:  # the torch executor imports torch
    _torch = None

# What a subclass defines to make the step (besides the optimizer's own
# helpers): one that redefines any of them gets the generic path on torch.
_STEP_METHODS = ("update_step", "_step_values", "_sums", "_assign")


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


def one_minus_power(beta, t):
    """1 - beta**t, accurate in float32 for beta near 1.

    In float32 `1 - 0.999**t` keeps only ~3 digits (0.999**t carries an
    absolute rounding of ~6e-8 and the difference is ~1e-3); the reference
    computes it in float64. -expm1(t * log(beta)) keeps full precision.
    """
    if beta == 0:
        return ops.ones_like(t)
    return -ops.expm1(t * math.log(beta))


@dataclasses.dataclass(frozen=True)
class _VariablePlan:
    """Static facts per variable index, decided once in `build`.

    On TensorFlow `update_step` receives the raw tf.Variable, which has no
    Keras path, so everything that depends on the path is decided here.
    """

    # AdamP, SGDP: the layout of a variable the projection may act on (None
    # for rank <= 1 and biases). AdamS, AdamSRT, SGDMRT: the layout of a
    # designated variable, else None.
    layouts: tuple
    # AdamP, SGDP: the projection can be folded into the final update.
    folds: tuple = ()
    # AdamS, AdamSRT, SGDMRT: designated with groups of more than 1 element.
    transports: tuple = ()
    # Per variable, which decisions it is batched with (with the dtype of
    # its sums): variables sharded by a `keras.distribution` decide alone.
    batches: tuple = ()


def _tf_distributed():
    """True inside a tf.distribute strategy (not the default one)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def _batch_keys(variables):
    """Per variable, a key shared by the variables whose decisions may be made
    in one set of ops: all, unless a `keras.distribution` shards a variable
    (laying the per-channel vectors of differently sharded kernels side by
    side would make the SPMD partitioner gather them); such a variable
    decides alone."""
    distribution = getattr(keras.distribution, "distribution", lambda: None)()
    if distribution is None:
        return (0,) * len(variables)
    keys = []
    for index, variable in enumerate(variables):
        try:
            layout = distribution.get_variable_layout(variable)
        except (AttributeError, KeyError, NotImplementedError):  # replicated
            layout = None
        axes = getattr(layout, "axes", None) or ()
        keys.append(("alone", index) if any(a is not None for a in axes) else 0)
    return tuple(keys)


class StepOptimizer(keras.optimizers.Optimizer):
    """Base of the five optimizers: not for direct use.

    A subclass defines, per variable index,

    * `_step_values(learning_rate, dtype)`: the tuple of values its update
      needs that are the same for every variable of a dtype (computed once
      per step and dtype);
    * `_sums(index, variable, gradient, values)`: what the projection's
      decision needs (`projection.channel_sums`), or None where there is no
      decision; it must not assign anything;
    * `_assign(index, variable, gradient, values, coef, ratio)`: the update,
      computed from the optimizer's state as it was before the step, and its
      assignments (`coef`, `ratio` from `projection.coefficients`, None
      where `_sums` was None).

    On torch, a class may name its step in keras_adamp/_torch.py
    (`_torch_step`, a key of `_torch.STEPS`); its subclasses get that step
    too unless they redefine one of the methods above or `update_step`.
    """

    # The name of this class's step in `_torch.STEPS` (None: the generic
    # path).
    _torch_step = None

    def __init__(self, learning_rate, weight_decay=None, name=None, **kwargs):
        if name is None:
            # Unique per process, as Keras's own optimizers ("adam",
            # "adam_1"): TensorBoard and the LR callbacks log
            # `learning_rate_{name}`, so two AdamP must not share a name.
            name = unique_name(type(self).__name__.lower())
        if isinstance(learning_rate, numbers.Real):
            learning_rate = check_range("learning_rate", learning_rate, 0.0)
        if weight_decay is not None:
            weight_decay = check_range("weight_decay", weight_decay, 0.0)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )

    def _decays(self, variable):
        """Whether `variable` is decayed, read at each step as Keras does (a
        `weight_decay` or `exclude_from_weight_decay` set after `build` is
        honoured from the next traced step on)."""
        return bool(self.weight_decay) and self._use_weight_decay(variable)

    def _dense(self, gradient, variable):
        # The channel sums need the whole gradient. On TensorFlow an
        # Embedding's gradient is IndexedSlices: scatter sums repeated
        # indices, as IndexedSlices do. Other sparse gradients
        # (tf.SparseTensor, JAX's BCOO, torch sparse tensors) are densified
        # by the backend.
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

    # -- the step ----------------------------------------------------------

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        self._run_step([gradient], [variable], learning_rate)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # The one entry of a step for every backend. On torch the whole
        # variable list is updated in place by keras_adamp/_torch.py, unless
        # it declines (a StatelessScope, a subclass's own step).
        if type(self).update_step is not StepOptimizer.update_step:
            # A subclass's own `update_step`: Keras's loop calls it per
            # variable (on TensorFlow, in each variable's cross-replica
            # update).
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        if _torch is not None and _torch.update(
            self, grads, trainable_variables, learning_rate
        ):
            return
        if _tf_distributed():
            self._tf_distributed_step(grads, trainable_variables, learning_rate)
            return
        self._run_step(grads, trainable_variables, learning_rate)

    def _torch_step_name(self):
        """The name of this optimizer's step in `_torch.STEPS`, or None where
        the generic path must run: the class that names the step is not the
        one whose step methods run (a subclass redefines one)."""
        cls = type(self)
        owner = next(c for c in cls.__mro__ if "_torch_step" in vars(c))
        for name in _STEP_METHODS:
            if getattr(cls, name) is not getattr(owner, name):
                return None
        return owner._torch_step

    def _apply_weight_decay(self, variables):
        # Keras's torch optimizers decay `variable.value` in place: inside a
        # StatelessScope that would write into the tensors the caller mapped
        # the variables to. There the decay is assigned, as on the other
        # backends.
        if _torch is None or not _torch.in_stateless_scope():
            super()._apply_weight_decay(variables)
            return
        learning_rate = self.learning_rate
        for variable in variables:
            if self._decays(variable):
                lr = ops.cast(learning_rate, variable.dtype)
                wd = ops.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr)

    def _run_step(self, grads, variables, learning_rate):
        for entry in self._decide(grads, variables, learning_rate):
            self._assign_after(*entry)

    def _decide(self, grads, variables, learning_rate):
        """Phases 1 and 2: `[(index, variable, g, values, coef, ratio)]`, with
        `g` the dense gradient; nothing assigned."""
        shared = {}
        entries = []
        for gradient, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            g = self._dense(gradient, variable)
            dtype = keras.backend.standardize_dtype(variable.dtype)
            if dtype not in shared:
                shared[dtype] = self._step_values(learning_rate, dtype)
            values = shared[dtype]
            sums = self._sums(index, variable, g, values)
            entries.append([index, variable, g, values, sums, None])
        # One decision per dtype of the sums and batch key.
        groups = {}
        for entry in entries:
            sums = entry[4]
            if sums is None:
                continue
            batch = self._plan.batches[entry[0]] if self._plan.batches else 0
            key = (keras.backend.standardize_dtype(sums.dtype), batch)
            groups.setdefault(key, []).append(entry)
        for group in groups.values():
            results = self._coefficients(
                [self._plan.layouts[e[0]] for e in group], [e[4] for e in group]
            )
            for entry, (coef, ratio) in zip(group, results):
                entry[4], entry[5] = coef, ratio
        return [tuple(e) for e in entries]

    def _coefficients(self, layouts, sums):
        """Per variable, `(coef, ratio)` of its projection (the projected
        family overrides)."""
        raise NotImplementedError

    def _assign_after(self, index, variable, g, values, coef, ratio):
        """`_assign`, made to wait for the decision on TensorFlow graphs.

        Otherwise the executor would compute the update's elementwise part
        as soon as its inputs are ready, and hold it until the decision: a
        buffer of the variable's size per variable at peak.
        """
        if coef is None or keras.backend.backend() != "tensorflow":
            self._assign(index, variable, g, values, coef, ratio)
            return
        import tensorflow as tf

        if tf.executing_eagerly():
            self._assign(index, variable, g, values, coef, ratio)
            return
        with tf.control_dependencies([coef, ratio]):
            self._assign(index, variable, g, values, coef, ratio)

    def _tf_distributed_step(self, grads, variables, learning_rate):
        """The step under a tf.distribute strategy, one decision for all
        variables.

        As Keras's own TensorFlow step, the gradients are all-reduced in
        replica context and each variable is assigned in its cross-replica
        update. In between, every replica holds the same gradients and
        weights, so the sums and the decision are computed there, in replica
        context (pure computation); each variable's update then receives its
        gradient, coefficients and step values as arguments, unwrapped per
        device.
        """
        import tensorflow as tf

        variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
        grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        entries = self._decide(
            [g for g, _ in grads_and_vars],
            [v for _, v in grads_and_vars],
            learning_rate,
        )
        indices = [e[0] for e in entries]
        # Only tensors (and the Python values among the step values) cross
        # the merge call; None never does.
        payloads = [tuple(x for x in e[2:] if x is not None) for e in entries]

        def update(distribution, variables, payloads):
            for index, variable, payload in zip(indices, variables, payloads):

                def fn(var, *payload, index=index):
                    g, values = payload[0], payload[1]
                    coef, ratio = payload[2:] if len(payload) > 2 else (None, None)
                    self._assign_after(index, var, g, values, coef, ratio)

                distribution.extended.update(
                    variable, fn, args=tuple(payload), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(
            update,
            self._distribution_strategy,
            [e[1] for e in entries],
            payloads,
        )

    def _adam_step_sizes(self, learning_rate, dtype):
        """The learning rate, sqrt(1 - beta_2**t) and lr / (1 - beta_1**t),
        in `dtype` (for the Adam family)."""
        lr = ops.cast(learning_rate, dtype)
        # Bias corrections in float32 whatever the variable's dtype: in
        # float16, t * log(beta) and 1 - beta**t lose the step count.
        t = ops.cast(self.iterations + 1, "float32")
        sqrt_bc2 = ops.cast(ops.sqrt(one_minus_power(self.beta_2, t)), dtype)
        step_size = lr / ops.cast(one_minus_power(self.beta_1, t), dtype)
        return lr, sqrt_bc2, step_size


class ProjectedOptimizer(StepOptimizer):
    """Base of AdamP and SGDP: not for direct use.

    Weight decay is applied in the update (`_finish`): its factor depends on
    whether the projection fired (wd_ratio) for that variable at that step.
    """

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
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=0.0 if weight_decay is None else weight_decay,
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
            batches=_batch_keys(var_list),
        )

    def _apply_weight_decay(self, variables):
        # Decay is applied in the update: its factor depends on whether the
        # projection fired (wd_ratio) for that variable at that step.
        return

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

    def _coefficients(self, layouts, sums):
        return projection.coefficients(
            layouts, sums, self.delta, self.wd_ratio, self.epsilon
        )

    def _channel_sums(self, index, variable, g, u):
        """`projection.channel_sums` of a variable the projection may act on,
        else None."""
        layout = self._plan.layouts[index]
        if layout is None:
            return None
        return projection.channel_sums(variable, g, u, layout)

    def _finish(self, index, variable, u, step, decay, coef, ratio, store=None):
        """Assigns ``variable <- decayed(variable) - step * projected(u)``
        (and ``store <- projected(u)`` if `store` is given), with `decay` the
        step's ``lr * weight_decay * scale`` and `coef`, `ratio` the
        variable's decision (None: never projected).

        Where the projected update need not be stored the projection is
        folded into one expression,

            w * d - step * (u - w * c)  ==  w * (d + step * c) - step * u,

        which saves two full-size passes where ops are not fused (not for
        16-bit variables, whose coefficients are float32).
        """
        layout = self._plan.layouts[index]
        decays = self._decays(variable)
        if layout is None:  # rank <= 1: never projected
            if store is not None:
                self.assign(store, u)
            w = variable * (1.0 - decay) if decays else variable
            self.assign(variable, w - step * u)
            return
        if store is None and self._plan.folds[index]:
            scale = 1.0 + step * coef
            if decays:
                scale = scale - decay * ratio
            self.assign(
                variable,
                projection.per_channel(
                    lambda w, u, s: w * s - step * u, scale, layout, variable, u
                ),
            )
            return
        u = projection.remove_radial(variable, u, coef, layout)
        ratio = ops.cast(ratio, u.dtype)
        if store is not None:
            self.assign(store, u)
        w = variable * (1.0 - decay * ratio) if decays else variable
        self.assign(variable, w - step * u)

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
