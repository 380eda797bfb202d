import contextlib
import functools

import keras
from keras import ops

from keras_adamp import layouts
from keras_adamp import projection
from keras_adamp._base import ProjectedOptimizer
from keras_adamp._base import StepOptimizer
from keras_adamp._base import _tf_distributed
from keras_adamp._base import _VariablePlan
from keras_adamp._base import check_range
from keras_adamp._base import unique_name

# Whether the generic step's sums are taken in row blocks
# (`projection._channel_sums`): on TensorFlow's XLA (2.21) the blocked sums
# are faster; on JAX's XLA (jax 0.10) reducing directly is faster, and with
# the kernels taken one at a time the blocks did not lower its temporaries
# either (one kernel of 512^2: SGD 0.81 against 1.00 kernels' sizes, AdamW
# 1.56 against 1.25). Elsewhere the sums are never blocked.
_BLOCKED_SUMS = keras.backend.backend() != "jax"

if keras.backend.backend() == "torch":
    from keras_adamp import _torch_projected as _torch_step
else:
    _torch_step = None


@keras.saving.register_keras_serializable(package="keras_adamp")
class Projected(keras.optimizers.Optimizer):
    """Wraps any Keras optimizer with AdamP's projection.

    AdamP and SGDP (Heo et al., 2021) are Adam and SGD plus one step: for a
    weight whose gradient is nearly orthogonal to it,
    `|cos(g, w)| < delta / sqrt(dim)` (a kernel followed by BatchNorm or
    LayerNorm: scale-invariant), the radial component of the update is
    removed, so that momentum stops inflating the weight norm (which would
    shrink the effective step size), and the weight decay on that weight is
    scaled by `wd_ratio`. The argument is not about Adam: it holds for any
    momentum-based optimizer. `Projected` takes that step on the update of
    any Keras optimizer (Lion, Lamb, Adafactor, Muon, Nadam, RMSprop, SGD,
    AdamW, ...).

    At each step the inner optimizer runs as it would alone (its clipping,
    weight decay, gradient accumulation, EMA, slots and learning-rate
    schedule are its own). Then, for each kernel the package's channel
    rules cover, with `w` the weight before the inner's update and
    `d = w_new - w` that update:

    - the cosine test is tried per output channel, then on the whole
      tensor (with `delta / sqrt(group size)` as threshold), exactly as in
      `AdamP`;
    - where a view passes, `d <- d - w <w, d> / (||w|| + eps)^2` per group,
      and the decoupled weight decay the inner applied this step is scaled
      by `wd_ratio` (undone in part);
    - elsewhere the weight is left exactly as the inner left it.

    The projection is linear in the update and blind to its scale, so
    `Projected(keras.optimizers.AdamW(...))` is AdamP and
    `Projected(keras.optimizers.SGD(momentum=0.9, nesterov=True))` is SGDP
    with Nesterov momentum, up to Keras's conventions (Adam's epsilon is
    added to `sqrt(v)` before the bias correction; SGD keeps the learning
    rate inside its momentum, which differs from PyTorch's buffer under a
    changing learning rate; the decay is `lr * weight_decay` where SGDP
    divides it by `1 - momentum`). Biases of any rank and variables of rank
    <= 1 are never projected: they step exactly as with the inner optimizer.

    The inner optimizer belongs to the wrapper: its learning rate,
    iterations and variables are the wrapper's. Put a
    `keras.optimizers.LossScaleOptimizer` outside (`compile` does so under
    the `mixed_float16` policy), not inside.

    Args:
        inner_optimizer: The `keras.optimizers.Optimizer` instance to wrap
            (not a `LossScaleOptimizer`, a `MultiOptimizer`, nor one of
            keras_adamp's optimizers, which project or transport already).
        delta: A float, the cosine threshold of the scale-invariance test.
            Defaults to `0.1`.
        wd_ratio: A float in [0, 1], the factor applied to the inner
            optimizer's decoupled weight decay on projected weights.
            Defaults to `0.1`.
        eps: A small float used in the cosine's norms and the projection's
            `||w|| + eps` (the inner optimizer keeps its own `epsilon`).
            Defaults to `1e-8`.
        channel_axes: Optional dict `{pattern: axes}` overriding which axes
            of a variable index its output channels, as for `AdamP`:
            `pattern` is a regular expression searched in `variable.path`,
            `axes` an int or a list of ints, `[]` for the whole tensor as one
            group. `keras_adamp.channel_axes_for(model)` derives it from the
            model's layers. Defaults to `None` (the static rules of
            `keras_adamp.layouts.default_channel_axes`).
        name: String or `None`. Defaults to `None`: `"projected"`, made
            unique in the process (`projected_1`, ...).

    Example:

    ```python
    optimizer = keras_adamp.Projected(
        keras.optimizers.Lion(learning_rate=1e-4, weight_decay=0.1)
    )
    model.compile(optimizer=optimizer, loss="mse")
    ```

    References:
        - [Heo et al., 2021](https://arxiv.org/abs/2006.08217)
        - [Official PyTorch code](https://github.com/clovaai/AdamP)
    """

    def __init__(
        self,
        inner_optimizer,
        delta=0.1,
        wd_ratio=0.1,
        eps=1e-8,
        channel_axes=None,
        name=None,
        **kwargs,
    ):
        _check_inner(inner_optimizer)
        if kwargs:
            raise ValueError(
                f"Projected does not take {sorted(kwargs)}: set the learning "
                f"rate, weight decay, clipping, EMA, loss scale and gradient "
                f"accumulation on the inner optimizer, e.g. "
                f"Projected(keras.optimizers.AdamW(weight_decay=...))."
            )
        if name is None:
            name = unique_name("projected")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.delta = check_range("delta", delta, 0.0)
        self.wd_ratio = check_range("wd_ratio", wd_ratio, 0.0, 1.0, True)
        self.eps = check_range("eps", eps, 0.0)
        self.channel_axes = layouts.validate_channel_axes(channel_axes)
        self._plan = None
        # The projection runs inside the inner optimizer's step, between its
        # clipping and decay and its EMA: its `_backend_update_step` becomes
        # the projected one (set on the instance, past Keras's tracking).
        original = inner_optimizer._backend_update_step

        def projected_update_step(grads, trainable_variables, learning_rate):
            self._step(original, grads, trainable_variables, learning_rate)

        object.__setattr__(
            inner_optimizer, "_backend_update_step", projected_update_step
        )
        object.__setattr__(inner_optimizer, "_keras_adamp_projected", True)

    # -- what the wrapper delegates --------------------------------------

    def build(self, var_list):
        if self.built:
            return
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        # Warns once, here, about patterns that match no trainable variable.
        self._plan = _VariablePlan(
            layouts=tuple(
                layouts.resolve_channel_axes(
                    var_list, self.channel_axes, owner="Projected"
                )
            )
        )
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer "
                    "must already be built: call "
                    "`optimizer.build(trainable_variables)` first."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        self.inner_optimizer.apply(grads, trainable_variables)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def loss_scale_factor(self):
        inner = self.__dict__.get("inner_optimizer")
        return None if inner is None else inner.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        # Set to None by a LossScaleOptimizer around the wrapper (and by the
        # base constructor, before the inner optimizer is known).
        inner = self.__dict__.get("inner_optimizer")
        if inner is not None:
            inner.loss_scale_factor = value

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # The layout of a variable, as AdamP's (same plan, same override).
    channel_layout = ProjectedOptimizer.channel_layout
    # The whole gradient as AdamP's projection sees it.
    _dense = StepOptimizer._dense

    # -- the step ----------------------------------------------------------

    def _layout(self, variable):
        return self._plan.layouts[self._get_variable_index(variable)]

    def _decay_rate(self, variable):
        """The weight decay the inner optimizer applied to `variable` this
        step, as a factor of the learning rate (0.0 for none)."""
        inner = self.inner_optimizer
        rate = inner.weight_decay
        if isinstance(inner, keras.optimizers.Muon) and inner._should_use_adamw(
            variable
        ):
            rate = inner.adam_weight_decay
        if not rate or not inner._use_weight_decay(variable):
            return 0.0
        return float(rate)

    def _step(self, original, grads, variables, learning_rate):
        """The inner optimizer's step, then the projection of its update."""
        if _torch_step is not None:
            if _torch_step.step(self, original, grads, variables, learning_rate):
                return
            context = _torch_step.no_grad()
        else:
            context = contextlib.nullcontext()
        if _tf_distributed():
            self._tf_distributed_step(grads, variables, learning_rate)
            return
        with context:
            self._ordered_step(original, grads, variables, learning_rate)

    def _ordered_step(self, original, grads, variables, learning_rate):
        """The test of every kernel first (it reads only the gradient and
        the weight), then the inner's step and the projection one variable
        at a time, each next variable's gradient only once the last kernel's
        coefficients are known (`_after`): a compiled step then holds one
        updated kernel at a time, not all of them. XLA's CPU scheduler runs
        whatever is ready, breadth first: deciding after the inner's step on
        every kernel held every updated kernel until the last decision (the
        inner's temporaries plus 1.25 parameters' sizes on TensorFlow, plus
        1.0 on JAX, 16 kernels).

        Where the inner's step is not a loop over its variables (Nadam), it
        runs on all of them at once, and the kernels are then projected one
        at a time.
        """
        held = {}
        sums = None
        for index, (gradient, variable) in enumerate(zip(grads, variables)):
            layout = self._layout(variable)
            if layout is None:
                continue
            w = _snapshot(variable)
            g = self._dense(gradient, variable)
            read = w
            if sums is not None:
                # After the last kernel's sums, so that their row blocks
                # are held one kernel at a time.
                read, g = _after([w, g], sums)
            sums = projection.test_sums(read, g, layout, _BLOCKED_SUMS)
            held[index] = (variable, layout, w, self._decay_rate(variable), sums)
        decided = dict(zip(held, self._decide(list(held.values()))))
        if not _steps_per_variable(type(self.inner_optimizer)):
            original(grads, variables, learning_rate)
            for index, entry in held.items():
                self._project(entry, decided[index], learning_rate)
            return
        coef = None
        for index, (gradient, variable) in enumerate(zip(grads, variables)):
            if coef is not None:
                # The gradient, not the learning rate: an inner may read its
                # own, and XLA on JAX sees through a scalar's dependency.
                [gradient] = _after([gradient], coef)
            original([gradient], [variable], learning_rate)
            if index in held:
                coef = self._project(held[index], decided[index], learning_rate)

    def _decide(self, held):
        """The test of every variable of `held`, in one set of small ops per
        dtype of their sums.

        Args:
            held: `(variable, layout, weight before, decay rate, test sums)`
                per variable to project.

        Returns:
            A `projection.Decision` per variable of `held`.
        """
        groups = {}
        for index, (_, layout, _, _, sums) in enumerate(held):
            key = keras.backend.standardize_dtype(sums.dtype)
            groups.setdefault(key, []).append((index, layout, sums))
        decided = [None] * len(held)
        for group in groups.values():
            results = projection.decisions(
                [layout for _, layout, _ in group],
                [sums for _, _, sums in group],
                self.delta,
                self.wd_ratio,
                self.eps,
            )
            for (index, _, _), decision in zip(group, results):
                decided[index] = decision
        return decided

    def _project(self, entry, decision, learning_rate):
        """Projects the update the variable of `entry` (as `_decide`'s
        `held`) received, as `decision` says, and gives back part of the
        inner's decay; returns the coefficients of its correction
        ``variable - w * coef``, `w` the weight before the inner's step."""
        variable, layout, w, rate, _ = entry
        now = ops.convert_to_tensor(variable)
        dtype = now.dtype
        wu = projection.radial_sums(w, now - w, layout, _BLOCKED_SUMS)
        coef = projection.decided_coefficients(decision, wu)
        if rate:
            # The inner decayed w by (1 - decay); projected weights get
            # (1 - decay * ratio): w * decay (1 - ratio) / (1 - decay) is
            # given back.
            decay = ops.cast(learning_rate, coef.dtype) * rate
            coef = coef - decay * (1.0 - decision.ratio) / (1.0 - decay)
        now, w = projection._in_float32(dtype, now, w)
        self.inner_optimizer.assign(
            variable,
            ops.cast(
                projection.per_channel(
                    lambda now, w, c: now - w * c, coef, layout, now, w
                ),
                dtype,
            ),
        )
        return coef

    def _tf_distributed_step(self, grads, variables, learning_rate):
        """The step under a tf.distribute strategy.

        As the inner's own TensorFlow step: the gradients are all-reduced in
        replica context and each variable is updated in its cross-replica
        update, where the weight before the inner's update is read, the inner
        updates it and the update is projected (each variable decides alone).
        """
        import tensorflow as tf

        inner = self.inner_optimizer
        plan = [(self._layout(v), self._decay_rate(v)) for v in variables]
        variables = [v.value if isinstance(v, keras.Variable) else v for v in variables]
        grads_and_vars = inner._all_reduce_sum_gradients(list(zip(grads, variables)))

        def update(distribution, grads_and_vars, learning_rate):
            for (gradient, variable), (layout, rate) in zip(grads_and_vars, plan):

                def fn(var, gradient, learning_rate, layout=layout, rate=rate):
                    if layout is None:
                        inner.update_step(gradient, var, learning_rate)
                        return
                    w = tf.convert_to_tensor(var)
                    sums = projection.test_sums(
                        w, self._dense(gradient, var), layout, _BLOCKED_SUMS
                    )
                    entry = (var, layout, w, rate, sums)
                    [decision] = self._decide([entry])
                    inner.update_step(gradient, var, learning_rate)
                    self._project(entry, decision, learning_rate)

                distribution.extended.update(
                    variable, fn, args=(gradient, learning_rate), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(
            update, inner._distribution_strategy, grads_and_vars, learning_rate
        )

    # -- serialization -----------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "delta": self.delta,
            "wd_ratio": self.wd_ratio,
            "eps": self.eps,
            "channel_axes": layouts.channel_axes_config(self.channel_axes),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)


def _check_inner(inner):
    """Raises ValueError, saying what to do instead, for what cannot be
    wrapped."""
    if isinstance(
        inner, (keras.optimizers.MultiOptimizer, keras.optimizers.OptimizerMap)
    ):
        raise ValueError(
            f"Projected cannot wrap a {type(inner).__name__}: wrap the "
            f"optimizers it maps instead, each in its own Projected."
        )
    if isinstance(inner, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "Projected cannot wrap a LossScaleOptimizer: put the "
            "LossScaleOptimizer outside, "
            "LossScaleOptimizer(Projected(inner_optimizer)) (`compile` does "
            "it under the mixed_float16 policy)."
        )
    if isinstance(inner, Projected) or getattr(inner, "_keras_adamp_projected", False):
        raise ValueError(
            "This optimizer is already wrapped by a Projected: one projection "
            "per optimizer."
        )
    if isinstance(inner, StepOptimizer):
        name = type(inner).__name__
        base = "AdamW" if "Adam" in name else "SGD"
        raise ValueError(
            f"Projected cannot wrap keras_adamp.{name}, which already "
            f"projects (or keeps weights on the sphere): its projection would "
            f"be applied twice. Use keras_adamp.{name} alone, or wrap its "
            f"Keras base: Projected(keras.optimizers.{base}(...))."
        )
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "Projected wraps a keras.optimizers.Optimizer instance, e.g. "
            "Projected(keras.optimizers.AdamW()) or "
            "Projected(keras.optimizers.get('lion')). "
            f"Received: {inner!r}"
        )
    owner = next(
        cls for cls in type(inner).__mro__ if "_apply_weight_decay" in cls.__dict__
    )
    if not owner.__module__.startswith("keras.") and inner.weight_decay:
        raise ValueError(
            f"Projected cannot tell which weight decay {type(inner).__name__} "
            f"applies: its `_apply_weight_decay` is its own "
            f"({owner.__module__}.{owner.__qualname__}). Set its "
            f"`weight_decay` to None to wrap it."
        )


@functools.cache
def _steps_per_variable(cls):
    """Whether an inner optimizer of class `cls` steps by `update_step` on
    each variable in turn (Keras's own classes whose `_backend_update_step`
    is the base one or TensorFlow's; not Nadam, whose step first advances a
    product shared by all variables, nor torch's `_foreach` executors), so
    that its step can be taken one variable at a time."""
    owner = next(b for b in cls.__mro__ if "_backend_update_step" in b.__dict__)
    return cls.__module__.startswith("keras.") and owner.__module__ in (
        "keras.src.optimizers.base_optimizer",
        "keras.src.backend.tensorflow.optimizer",
    )


def _after(values, token):
    """The tensors `values`, available only once `token` is computed where
    ops may run in another order than the program's (a traced or compiled
    step); `values` themselves in eager mode (torch's generic path among
    it), and sparse gradients always.

    A TensorFlow graph without XLA keeps a control dependency. XLA drops
    control dependencies and optimization barriers before it schedules, so
    there the dependency is arithmetic: ``value + 0 * isnan(token[0, ...])``,
    exactly `value` (the factor is 0 or 1, never NaN), which XLA does not
    simplify away for a tensor (it did for a scalar on JAX).
    """
    backend = keras.backend.backend()
    if backend == "torch":
        return values  # eager: ops run in the program's order
    if backend == "jax":
        import jax

        dense = [isinstance(x, jax.core.Tracer) for x in values]
    else:
        import tensorflow as tf

        if tf.executing_eagerly():
            return values
        dense = [not isinstance(x, tf.IndexedSlices) for x in values]
        if not _in_xla_context():
            with tf.control_dependencies([token]):
                return [tf.identity(x) if d else x for x, d in zip(values, dense)]
    if not any(dense):
        return values
    while len(token.shape):
        token = token[0]
    zero = ops.cast(ops.isnan(token), "float32") * 0.0
    return [x + ops.cast(zero, x.dtype) if d else x for x, d in zip(values, dense)]


def _in_xla_context():
    """Whether TensorFlow is tracing a function XLA compiles (True where
    TensorFlow no longer says: the arithmetic dependency holds in graphs
    too)."""
    import tensorflow as tf

    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved it
        return True
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def _snapshot(variable):
    """The variable's value now, kept apart from later updates (a JAX array
    is immutable; elsewhere a copy: TensorFlow reads a variable when an op
    uses it, torch updates in place)."""
    if keras.backend.backend() == "jax":
        return variable.value
    return ops.copy(variable.value)
