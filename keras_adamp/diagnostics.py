"""Which variables AdamP and SGDP treat as scale-invariant, and why.

The optimizers decide at every step, per variable, from the gradient: a kernel
whose gradient is (nearly) orthogonal to it is scale-invariant, and its update is
projected per output channel or as a whole tensor. :func:`scale_invariance_report`
runs that same test (:func:`keras_adamp.projection.scale_invariance`, with the
optimizer's own layouts, ``delta`` and ``epsilon``) on the gradients of one batch
and returns one row per trainable variable::

    from keras_adamp import diagnostics

    rows = diagnostics.scale_invariance_report(model, x_batch, y_batch)
    print(diagnostics.format_report(rows))

Works on the TensorFlow, JAX and PyTorch backends (compiled with ``jax.jit``
on JAX). Gradients are those the optimizer would receive: under a
``LossScaleOptimizer`` the loss is scaled and the gradients unscaled, so float16
underflow does not pass for scale invariance. Model state is left as it was:
BatchNorm moving statistics updated by the forward pass are restored.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_adamp import layouts
from keras_adamp import projection

#: Decisions, as written in :attr:`VariableReport.decision`.
CHANNEL_WISE = "channel-wise"
LAYER_WISE = "layer-wise"
NOT_PROJECTED = "none"
RANK_LE_1 = "rank<=1"  # biases, normalisation scales: never projected
NO_GRADIENT = "no gradient"

_DECISIONS = {
    projection.CHANNEL_WISE: CHANNEL_WISE,
    projection.LAYER_WISE: LAYER_WISE,
    projection.NOT_PROJECTED: NOT_PROJECTED,
}


@dataclasses.dataclass(frozen=True)
class VariableReport:
    """One trainable variable's scale-invariance test.

    Attributes:
        path: The variable's path (``variable.path``).
        shape: Its shape.
        channel_axes: The axes grouped as one output channel (``()``: the whole
            tensor is one group), or None for rank <= 1.
        num_channels: Number of output-channel groups (0 for rank <= 1).
        decision: ``"channel-wise"``, ``"layer-wise"``, ``"none"`` (the update
            is not projected), ``"rank<=1"`` or ``"no gradient"``.
        max_channel_cos: max over channels of |cos(g_c, w_c)| (nan if n/a).
        channel_threshold: ``delta / sqrt(group size)``.
        layer_cos: |cos(g, w)| of the whole tensor.
        layer_threshold: ``delta / sqrt(numel)``.
        norm: ||w||.
    """

    path: str
    shape: tuple
    channel_axes: tuple
    num_channels: int
    decision: str
    max_channel_cos: float
    channel_threshold: float
    layer_cos: float
    layer_threshold: float
    norm: float

    @property
    def scale_invariant(self):
        """True when the optimizer projects this variable's update."""
        return self.decision in (CHANNEL_WISE, LAYER_WISE)


def compute_gradients(model, x, y, loss=None, training=True, optimizer=None):
    """The gradients of ``loss(y, model(x)) + sum(model.losses)`` on one batch,
    as the optimizer receives them.

    Under loss scaling (a ``LossScaleOptimizer``, which ``compile`` adds under
    ``mixed_float16``, or an optimizer's ``loss_scale_factor``) the loss is
    scaled before differentiation and the gradients unscaled after, as in a
    training step: differentiating the unscaled loss through float16 would
    flush small gradients to 0, and a zero gradient passes the
    scale-invariance test. On JAX the gradient is compiled (``jax.jit``).

    Args:
        model: A built Keras model.
        x: One batch's inputs (NumPy arrays or backend tensors).
        y: Its targets.
        loss: A loss (anything ``keras.losses.get`` accepts, or a callable
            ``loss(y_true, y_pred)``); default: the compiled ``model.loss``.
        training: Passed to the model call (BatchNorm in training mode by
            default, as during ``fit``).
        optimizer: Whose loss scale to use; default ``model.optimizer``.

    Returns:
        A list with, per ``model.trainable_variables``, a backend tensor or None
        (variable not used by the loss), in the variable's dtype. Non-trainable
        variables (BatchNorm moving statistics) are restored after the
        forward pass.
    """
    loss_fn = _loss_function(model, loss)
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    scale = _loss_scale(optimizer)
    variables = list(model.trainable_variables)
    frozen = list(model.non_trainable_variables)
    backend = keras.backend.backend()
    # JAX's stateless call leaves the variables alone: nothing to restore.
    saved = [] if backend == "jax" else [ops.copy(v.value) for v in frozen]
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                y_pred = model(x, training=training)
                value = _total_loss(loss_fn(y, y_pred), model.losses) * scale
            grads = tape.gradient(value, [v.value for v in variables])
        elif backend == "jax":
            import jax

            def loss_of(trainable, non_trainable, x, y):
                y_pred, _, losses = model.stateless_call(
                    trainable,
                    non_trainable,
                    x,
                    training=training,
                    return_losses=True,
                )
                return _total_loss(loss_fn(y, y_pred), losses) * scale

            grads = _jax_compiled(
                jax.grad(loss_of),
                [v.value for v in variables],
                [v.value for v in frozen],
                x,
                y,
            )
        elif backend == "torch":
            import torch

            y_pred = model(x, training=training)
            value = _total_loss(loss_fn(y, y_pred), model.losses) * scale
            grads = torch.autograd.grad(
                value, [v.value for v in variables], allow_unused=True
            )
        else:
            raise NotImplementedError(
                f"compute_gradients supports the tensorflow, jax and torch "
                f"backends, not {backend!r}."
            )
    finally:
        for variable, value in zip(frozen, saved):
            variable.assign(value)
    return [
        None if g is None else _unscaled(g, v.dtype, scale)
        for g, v in zip(grads, variables)
    ]


def _unscaled(gradient, dtype, scale):
    if keras.backend.standardize_dtype(gradient.dtype) != dtype:
        gradient = ops.cast(gradient, dtype)
    return gradient / scale if scale != 1.0 else gradient


def _loss_scale(optimizer):
    """The factor `optimizer` multiplies the loss by (1.0 if none): its
    ``scale_loss`` (a LossScaleOptimizer's current dynamic scale, or the
    ``loss_scale_factor`` of any Keras optimizer)."""
    scale_loss = getattr(optimizer, "scale_loss", None)
    if scale_loss is None:
        return 1.0
    return float(ops.convert_to_numpy(scale_loss(1.0)))


def _total_loss(value, losses):
    value = ops.mean(value)
    for extra in losses:
        value = value + ops.cast(extra, value.dtype)
    return value


def _loss_function(model, loss):
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "Pass `loss=` or compile the model first: the scale-invariance "
                "test needs the gradient of a loss."
            )
    if isinstance(loss, (str, dict)):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise ValueError(f"`loss` must be callable. Received: {loss!r}")
    return loss


def _test_settings(optimizer):
    delta = getattr(optimizer, "delta", 0.1)
    # Projected names its epsilon `eps`: its inner optimizer's `epsilon` is
    # another one (Adam's denominator).
    eps = getattr(optimizer, "eps", None)
    if eps is None:
        eps = getattr(optimizer, "epsilon", 1e-8)
    return float(delta), float(eps)


def _layouts(optimizer, variables):
    if getattr(optimizer, "built", False) and hasattr(optimizer, "channel_layout"):
        try:
            return [optimizer.channel_layout(v) for v in variables]
        except ValueError:
            pass  # built on other variables: fall back to the same rules
    return layouts.resolve_channel_axes(
        variables,
        getattr(optimizer, "channel_axes", None),
        owner="scale_invariance_report",
    )


def scale_invariance_report(model, x, y, optimizer=None, loss=None, gradients=None):
    """Runs the optimizer's scale-invariance test on one batch's gradients.

    Args:
        model: A built Keras model.
        x: One training batch's inputs.
        y: Its targets.
        optimizer: An ``AdamP``/``SGDP``/``Projected`` (default:
            ``model.optimizer`` if it is one). Its ``delta``, ``epsilon``
            (``Projected``'s ``eps``) and layouts (``channel_layout``,
            hence any ``channel_axes`` override) are used; for another
            optimizer, or None, the defaults (delta 0.1, eps 1e-8, the default
            layout rules).
        loss: See :func:`compute_gradients`.
        gradients: Precomputed gradients, one per
            ``model.trainable_variables`` (then `x`, `y` and `loss` are unused),
            unscaled.

    Returns:
        A list of :class:`VariableReport`, in ``model.trainable_variables``
        order.
    """
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    variables = list(model.trainable_variables)
    if gradients is None:
        # With the wrapper: gradients as a LossScaleOptimizer's training step
        # computes them (scaled loss, unscaled gradients).
        gradients = compute_gradients(model, x, y, loss=loss, optimizer=optimizer)
    if len(gradients) != len(variables):
        raise ValueError(
            f"Expected one gradient per trainable variable ({len(variables)}), "
            f"received {len(gradients)}."
        )
    # A LossScaleOptimizer (mixed_float16) wraps the real one.
    optimizer = layouts.projecting_optimizer(optimizer)
    delta, eps = _test_settings(optimizer)
    variable_layouts = _layouts(optimizer, variables)
    tested = [
        i
        for i, (g, layout) in enumerate(zip(gradients, variable_layouts))
        if g is not None and layout is not None
    ]
    results = _tests(
        [variables[i].value for i in tested],
        [_unscaled(gradients[i], variables[i].dtype, 1.0) for i in tested],
        tuple(variable_layouts[i] for i in tested),
        delta,
        eps,
    )
    results = dict(zip(tested, results))
    return [
        _row(variable, gradient, layout, delta, results.get(i))
        for i, (variable, gradient, layout) in enumerate(
            zip(variables, gradients, variable_layouts)
        )
    ]


def _tests(ws, gs, variable_layouts, delta, eps):
    """Per variable ``(decision, max channel |cos|, layer |cos|)`` as NumPy
    values, all variables in one call: compiled on JAX (eager JAX compiles
    every small op of every variable shape on its own).

    The cosines are the optimizer's (:func:`projection.cosines`); the decision
    compares them with the thresholds as :func:`projection.scale_invariance`
    does (both views tested on the same sums: computing them once halves what
    JAX compiles), and the tests check that the two agree.
    """

    def test_all(ws, gs):
        out = []
        for w, g, layout in zip(ws, gs, variable_layouts):
            channel_cos, layer_cos = projection.cosines(w, g, layout, eps)
            max_cos = ops.max(channel_cos)
            channel_wise = max_cos < delta / math.sqrt(layout.group_size)
            layer_wise = layer_cos < delta / math.sqrt(layout.numel)
            decision = ops.where(
                channel_wise,
                projection.CHANNEL_WISE,
                ops.where(layer_wise, projection.LAYER_WISE, projection.NOT_PROJECTED),
            )
            out.append((decision, max_cos, layer_cos))
        return out

    if keras.backend.backend() == "jax":
        results = _jax_compiled(test_all, list(ws), list(gs))
    else:
        results = test_all(ws, gs)
    return [tuple(ops.convert_to_numpy(x) for x in result) for result in results]


# XLA options for the diagnostics' one-off functions: the report runs each
# once, so compile time is what the user waits for; LLVM's optimisation
# passes take about half of it on CPU (MobileNetV2's gradient: 20 s -> 12 s
# on a loaded 2-core machine) and do not change the result's precision.
_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _jax_compiled(fn, *args):
    """``jax.jit(fn)(*args)``, compiled for one call with `_FAST_COMPILE`
    (plain ``jax.jit`` where this XLA refuses the options)."""
    import jax

    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(compiler_options=_FAST_COMPILE)
    # An XLA without these options: compile as jax.jit does.
    except Exception:  # noqa: BLE001
        compiled = lowered.compile()
    return compiled(*args)


def _row(variable, gradient, layout, delta, result):
    shape = tuple(variable.shape)
    w = ops.convert_to_numpy(variable.value).astype("float64")
    norm = float(np.sqrt(np.sum(w * w)))
    nan = float("nan")
    if layout is None:
        return VariableReport(
            variable.path, shape, None, 0, RANK_LE_1, nan, nan, nan, nan, norm
        )
    channel_threshold = delta / math.sqrt(layout.group_size)
    layer_threshold = delta / math.sqrt(layout.numel)
    if gradient is None:
        return VariableReport(
            variable.path,
            shape,
            layout.channel_axes,
            layout.num_channels,
            NO_GRADIENT,
            nan,
            channel_threshold,
            nan,
            layer_threshold,
            norm,
        )
    decision, max_channel_cos, layer_cos = result
    return VariableReport(
        variable.path,
        shape,
        layout.channel_axes,
        layout.num_channels,
        _DECISIONS[int(decision)],
        float(max_channel_cos),
        channel_threshold,
        float(layer_cos),
        layer_threshold,
        norm,
    )


def summarize(rows):
    """Counts per decision, and the share of projected parameters.

    Returns:
        A dict ``{decision: number of variables}`` plus ``"projected_params"``
        and ``"total_params"`` (element counts).
    """
    counts = {}
    projected = total = 0
    for row in rows:
        counts[row.decision] = counts.get(row.decision, 0) + 1
        size = math.prod(row.shape)
        total += size
        if row.scale_invariant:
            projected += size
    counts["projected_params"] = projected
    counts["total_params"] = total
    return counts


def format_report(rows):
    """The report as a fixed-width text table, with a summary line."""
    header = (
        "variable",
        "shape",
        "channels",
        "decision",
        "max|cos_c|",
        "thr_c",
        "|cos|",
        "thr",
        "||w||",
    )
    lines = []
    for row in rows:
        lines.append(
            (
                row.path,
                "x".join(str(d) for d in row.shape) or "()",
                "-"
                if row.channel_axes is None
                else f"{row.num_channels} by {list(row.channel_axes)}",
                row.decision,
                _fmt(row.max_channel_cos),
                _fmt(row.channel_threshold),
                _fmt(row.layer_cos),
                _fmt(row.layer_threshold),
                _fmt(row.norm),
            )
        )
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    out += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines
    ]
    summary = summarize(rows)
    share = summary["projected_params"] / max(summary["total_params"], 1)
    out.append(
        f"{summary.get(CHANNEL_WISE, 0)} channel-wise, "
        f"{summary.get(LAYER_WISE, 0)} layer-wise, "
        f"{summary.get(NOT_PROJECTED, 0)} not projected, "
        f"{summary.get(RANK_LE_1, 0)} of rank <= 1; "
        f"{100 * share:.1f}% of the parameters are treated as scale-invariant."
    )
    return "\n".join(out)


def _fmt(value):
    if math.isnan(value):
        return "-"
    return f"{value:.3g}"
