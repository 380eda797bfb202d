"""The projection shared by AdamP and SGDP, and the Keras layout rules it needs.

AdamP and SGDP (Heo et al., ICLR 2021) differ from Adam and SGD-momentum in one
step. For a weight ``w`` with gradient ``g`` and update ``u`` (the direction the
base optimizer is about to move along), the weight is judged scale-invariant when
the gradient is nearly orthogonal to it:

    |cos(g, w)| < delta / sqrt(dim(w))

and then the radial part of the update is removed, so momentum stops growing the
weight norm:

    u <- u - w_hat <w_hat, u>,     w_hat = w / (||w|| + eps)

and the decoupled weight decay is scaled by ``wd_ratio``. The test is tried first
per output channel (every channel must pass, each against
``delta / sqrt(group size)``), then on the whole tensor (against
``delta / sqrt(numel)``); the first view that passes is projected.

Everything here is a pure function of tensors and static shape facts:

* :func:`default_channel_axes` and :func:`resolve_channel_axes` decide which axes
  of a Keras variable index its output channels (Keras layouts differ from
  PyTorch's: a Dense or Conv kernel has its output channel last).
* :class:`ChannelLayout` turns that into a 2-D or 3-D view of the variable in
  which each output channel is one column, so that every per-channel sum is a
  single reduction.
* :func:`project` applies the test and the projection in one pass over ``w``,
  ``g`` and ``u``; :func:`scale_invariance` reports the decision alone.

The decision is made on device with ``ops.where``: no Python branch on a tensor
value, so the code compiles under XLA (``jit_compile=True``, ``jax.jit``).
"""

import dataclasses
import functools
import math
import re

import keras
from keras import ops

# What `scale_invariance` returns: which view of the variable passed the test.
NOT_PROJECTED = 0
CHANNEL_WISE = 1
LAYER_WISE = 2

_LOW_PRECISION = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """How a variable of a given shape is grouped into output channels.

    The variable is viewed as ``view``: the output-channel axes (contiguous in the
    variable) are merged into one axis of size ``num_channels``; the axes before
    and after them are merged too and summed over (``reduce_axes``). Reshaping is
    free, and a reduction over one merged axis is cheaper than over several.

    Attributes:
        shape: The variable's shape.
        channel_axes: Non-negative, sorted, contiguous axes of the variable that
            index its output channels. Empty means the whole tensor is one group.
        view: The shape the variable is reshaped to.
        reduce_axes: The axes of ``view`` summed within one output channel.
        group_size: Number of elements in one output channel.
        num_channels: Number of output channels.
    """

    shape: tuple
    channel_axes: tuple
    view: tuple
    reduce_axes: tuple
    group_size: int
    num_channels: int

    @classmethod
    def create(cls, shape, channel_axes):
        """Builds the layout of a variable of `shape` grouped by `channel_axes`.

        Args:
            shape: The variable's static shape (a tuple of ints).
            channel_axes: The axes that index an output channel: an int, a
                sequence of contiguous ints (negative ones count from the end),
                or an empty sequence for a single group (the whole tensor).

        Raises:
            ValueError: if an axis is out of range, repeated, or the axes are not
                contiguous.
        """
        shape = tuple(int(d) for d in shape)
        ndim = len(shape)
        axes = _normalize_axes(channel_axes, shape)
        numel = math.prod(shape)
        if not axes:
            # One group: a single column, summed over its rows.
            return cls(shape, (), (numel, 1), (0,), numel, 1)
        first, last = axes[0], axes[-1]
        pre = math.prod(shape[:first])
        channels = math.prod(shape[first : last + 1])
        post = math.prod(shape[last + 1 : ndim])
        if post == 1:
            view, reduce_axes = (pre, channels), (0,)
        elif pre == 1:
            view, reduce_axes = (channels, post), (1,)
        else:
            view, reduce_axes = (pre, channels, post), (0, 2)
        return cls(shape, axes, view, reduce_axes, pre * post, channels)

    @property
    def numel(self):
        return self.group_size * self.num_channels


def _normalize_axes(channel_axes, shape):
    ndim = len(shape)
    if isinstance(channel_axes, int):
        channel_axes = (channel_axes,)
    axes = []
    for axis in channel_axes:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(
                f"Channel axes must be integers. Received: {channel_axes!r} "
                f"for a variable of shape {shape}."
            )
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"Channel axis {axis} is out of range for a variable of shape "
                f"{shape} (rank {ndim})."
            )
        axes.append(axis % ndim)
    axes = sorted(axes)
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"Channel axes {tuple(channel_axes)} repeat an axis of a variable of "
            f"shape {shape}."
        )
    if axes and axes != list(range(axes[0], axes[-1] + 1)):
        raise ValueError(
            f"Channel axes {tuple(channel_axes)} must be contiguous for a "
            f"variable of shape {shape}."
        )
    return tuple(axes)


def default_channel_axes(shape, name=None):
    """The output-channel axes of a Keras variable, from static facts alone.

    The rules, for Keras's own layers:

    * ``Dense`` ``(in, out)`` and ``Conv1D/2D/3D`` ``(*kernel, in, out)``: the
      last axis.
    * Depthwise kernels ``(*kernel, C, M)`` (``DepthwiseConv1D/2D``, the
      ``depthwise_kernel`` of ``SeparableConv1D/2D``): the last two axes, C * M
      output channels. Recognised by the variable name ``depthwise_kernel``, or,
      for ``DepthwiseConv*`` (whose kernel is just ``kernel``), by a last axis of
      size 1 (depth multiplier 1, the MobileNet case) on a rank >= 3 kernel.
    * ``Embedding`` ``(vocab, dim)`` (variable name ``embeddings``): the rows,
      axis 0, since a LayerNorm after it normalises each token's vector.

    Args:
        shape: The variable's shape.
        name: The variable's own name (the last part of its path), or None.

    Returns:
        A tuple of axes, or None for a variable of rank <= 1 (never projected).
    """
    ndim = len(shape)
    if ndim <= 1:
        return None
    if name == "embeddings" and ndim == 2:
        return (0,)
    if name == "depthwise_kernel" or (ndim >= 3 and shape[-1] == 1):
        return (ndim - 2, ndim - 1)
    return (ndim - 1,)


def validate_channel_axes(channel_axes):
    """Checks a user's ``channel_axes`` override before any variable is seen.

    Returns it as a plain dict of ``{pattern: tuple of ints}``, the form stored
    in the optimizer's config.
    """
    if channel_axes is None:
        return None
    if not isinstance(channel_axes, dict):
        raise ValueError(
            "`channel_axes` must be a dict mapping a variable-path pattern to "
            f"the axes of its output channels. Received: {channel_axes!r}"
        )
    clean = {}
    for pattern, axes in channel_axes.items():
        if not isinstance(pattern, str):
            raise ValueError(
                "`channel_axes` keys must be strings (regular expressions "
                f"searched in variable paths). Received: {pattern!r}"
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`channel_axes` key {pattern!r} is not a valid regular "
                f"expression: {error}"
            ) from None
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = (axes,)
        if not isinstance(axes, (list, tuple)) or any(
            isinstance(a, bool) or not isinstance(a, int) for a in axes
        ):
            raise ValueError(
                f"`channel_axes[{pattern!r}]` must be an int or a list of ints. "
                f"Received: {axes!r}"
            )
        clean[pattern] = tuple(axes)
    return clean


def resolve_channel_axes(variables, channel_axes=None):
    """The layout of each variable: the override if a pattern matches, else
    :func:`default_channel_axes`.

    Args:
        variables: The variables the optimizer is built on.
        channel_axes: ``{pattern: axes}``; a pattern is a regular expression
            searched (``re.search``) in the variable's path, the first matching
            pattern wins.

    Returns:
        A list with, per variable, a :class:`ChannelLayout` or None (rank <= 1:
        never projected).

    Raises:
        ValueError: if a pattern matches no variable of rank >= 2, or its axes
            do not fit a variable it matches (the message names both).
    """
    channel_axes = channel_axes or {}
    used = set()
    layouts = []
    for variable in variables:
        shape = tuple(variable.shape)
        path = _variable_path(variable)
        if len(shape) <= 1:
            layouts.append(None)
            continue
        axes = None
        for pattern, pattern_axes in channel_axes.items():
            if re.search(pattern, path):
                axes = pattern_axes
                used.add(pattern)
                break
        if axes is None:
            axes = default_channel_axes(shape, path.split("/")[-1])
        try:
            layouts.append(ChannelLayout.create(shape, axes))
        except ValueError as error:
            raise ValueError(f"Variable '{path}': {error}") from None
    unused = [p for p in channel_axes if p not in used]
    if unused:
        known = ", ".join(
            f"'{_variable_path(v)}' {tuple(v.shape)}"
            for v in variables
            if len(v.shape) > 1
        )
        raise ValueError(
            f"`channel_axes` pattern(s) {unused} match no variable of rank >= 2. "
            f"Variables: {known or 'none'}."
        )
    return layouts


def _variable_path(variable):
    path = getattr(variable, "path", None) or variable.name
    return path[:-2] if path.endswith(":0") else path


# Backends whose reductions are compiled by XLA (always on JAX; on TensorFlow
# under `jit_compile=True`, and the partial sums cost nothing without it).
_XLA_STYLE_BACKENDS = ("tensorflow", "jax")
# Candidate numbers of row blocks, the first that divides the rows is used.
_BLOCKS = (4, 2)


@functools.lru_cache(maxsize=None)
def _block_count(layout):
    """How many row blocks `_channel_sums` adds elementwise before reducing
    (1: reduce directly). A static fact of the layout (and of the process's
    backend), cached so `update_step` does not decide it again each step."""
    if (
        layout.reduce_axes != (0,)
        or layout.num_channels == 1
        or keras.backend.backend() not in _XLA_STYLE_BACKENDS
    ):
        return 1
    rows = layout.view[0]
    return next((k for k in _BLOCKS if rows % k == 0 and rows >= 8 * k), 1)


def _channel_sums(w, g, u, layout):
    """Per-channel <g,w>, <g,g>, <w,w> and, if `u` is given, <w,u>, stacked into
    one `(3 or 4, num_channels)` tensor.

    Stacking keeps the small decision math to a few ops on one tensor, and the
    layer-level sums are taken from it (a sum over its last axis) rather than
    from the variable again: XLA folds a sum of a plain per-channel sum back
    into a second full pass over the products.

    For a tall `(pre, C)` view on XLA backends the rows are first cut into `k`
    blocks and ``sum_i a_i * b_i`` over the blocks is computed as one
    elementwise loop per pair with a `(pre / k, C)` output: it runs on every
    core and materialises no full-size product. Only that `k` times smaller
    result is then reduced (XLA on CPU reduces over rows in one thread,
    through a library kernel that cannot fuse the product into its input, so
    ``sum(a * b, axis=0)`` writes the product out and reads it back). Same
    sums, added in a different order. (Stacking the pairs' block sums into
    one loop, or more than 4 blocks, measured slower.)
    """
    pairs = [(g, w), (g, g), (w, w)]
    if u is not None:
        pairs.append((w, u))
    k = _block_count(layout)
    if k == 1:
        return ops.stack(
            [
                ops.reshape(
                    ops.sum(a * b, axis=layout.reduce_axes), (layout.num_channels,)
                )
                for a, b in pairs
            ]
        )
    shape = (k, layout.view[0] // k, layout.num_channels)
    blocks = {}

    def split(x):
        if id(x) not in blocks:
            blocks[id(x)] = ops.unstack(ops.reshape(x, shape), num=k, axis=0)
        return blocks[id(x)]

    sums = []
    for a, b in pairs:
        a, b = split(a), split(b)
        total = a[0] * b[0]
        for i in range(1, k):
            total = total + a[i] * b[i]
        sums.append(ops.sum(total, axis=0))
    return ops.stack(sums)


def _decide(sums, layout, delta, eps):
    """The test, on the stacked channel sums `(n, C)`.

    The layer-level sums are sums of the channel sums (no second pass), kept
    as one more column, so that the cosines and the projection coefficients of
    both views are one set of small ops on `(C + 1,)` rows.

    Returns:
        ``(channel_wise, layer_wise, cols, norm_w)``: two scalar booleans, the
        sums with the layer column appended, and ``sqrt(<w,w>)`` per column.
    """
    cols, norm_w, cos = _columns(sums, eps)
    channels = layout.num_channels
    channel_wise = ops.max(cos[:channels]) < delta / math.sqrt(layout.group_size)
    layer_wise = cos[channels] < delta / math.sqrt(layout.numel)
    return channel_wise, layer_wise, cols, norm_w


def _columns(sums, eps):
    """The stacked channel sums with the layer-level column appended, ||w|| and
    |cos(g, w)| per column (as torch.nn.functional.cosine_similarity: each
    norm clamped below at eps)."""
    cols = ops.concatenate([sums, ops.sum(sums, axis=1, keepdims=True)], axis=1)
    norm_w = ops.sqrt(cols[2])
    cos = ops.abs(cols[0]) / (
        ops.maximum(ops.sqrt(cols[1]), eps) * ops.maximum(norm_w, eps)
    )
    return cols, norm_w, cos


def _channel_column(x, layout):
    """A `(num_channels,)` tensor shaped to broadcast against `layout.view`."""
    if layout.reduce_axes == (0,):
        return x
    return ops.reshape(x, (layout.num_channels, 1))


def _is_low_precision(dtype):
    return keras.backend.standardize_dtype(dtype) in _LOW_PRECISION


def _views(layout, dtype, *tensors):
    """Each tensor reshaped to `layout.view`, in float32 if `dtype` is 16-bit.

    Norms and cosines of 16-bit variables are computed in float32: a float16
    <w,w> overflows at ||w|| > 256, and bfloat16 sums lose the decision.
    """
    low = _is_low_precision(dtype)
    views = [ops.reshape(x, layout.view) for x in tensors]
    return [ops.cast(x, "float32") if low else x for x in views]


def project(w, g, u, layout, delta, wd_ratio, eps):
    """Removes the radial part of `u` where `w` is scale-invariant.

    With per-channel sums over the groups c of `layout`:

        channel-wise if  max_c |cos(g_c, w_c)| < delta / sqrt(group_size)
        layer-wise   if  |cos(g, w)|           < delta / sqrt(numel)
        u_c <- u_c - w_c <w_c, u_c> / (||w_c|| + eps)^2       (channel-wise)
        u   <- u   - w   <w,   u  > / (||w||   + eps)^2       (else layer-wise)

    which equals the reference's ``u - w_n <w_n, u>`` with
    ``w_n = w / (||w|| + eps)``.

    Args:
        w: The variable's value (before weight decay).
        g: The raw gradient (not the momentum).
        u: The update the base optimizer computed.
        layout: A :class:`ChannelLayout` for `w`'s shape.
        delta: The cosine threshold (a Python float).
        wd_ratio: Weight-decay factor for projected variables (a Python float).
        eps: Added to ||w|| and clamping the cosine's norms (a Python float).

    Returns:
        ``(u_projected, decay_ratio)``: the update, of `u`'s shape and dtype, and
        a scalar, `wd_ratio` if a view passed the test else 1.
    """
    dtype = u.dtype
    w, g, u_view = _views(layout, dtype, w, g, u)
    coef, ratio = _coefficients(w, g, u_view, layout, delta, wd_ratio, eps)
    u_view = u_view - w * coef
    u = ops.cast(ops.reshape(u_view, layout.shape), dtype)
    return u, ops.cast(ratio, dtype)


def radial_coefficients(w, g, u, layout, delta, wd_ratio, eps):
    """What :func:`project` removes, as per-channel coefficients.

    Returns:
        ``(coef, decay_ratio)``: `coef` broadcasts against `layout.view` and
        ``project(...)[0] == reshape(u_view - w_view * coef, shape)``; it is
        float32 for 16-bit inputs, else of `u`'s dtype. `decay_ratio` as in
        :func:`project`. An optimizer can then fold the projection into its
        final update (``w * (decay + step * coef) - step * u``) and save two
        full-size passes when ops are not fused.
    """
    w, g, u_view = _views(layout, u.dtype, w, g, u)
    return _coefficients(w, g, u_view, layout, delta, wd_ratio, eps)


def _coefficients(w, g, u_view, layout, delta, wd_ratio, eps):
    sums = _channel_sums(w, g, u_view, layout)
    channel_wise, layer_wise, cols, norm_w = _decide(sums, layout, delta, eps)

    # <w,u> / (||w|| + eps)^2 per channel, and for the layer in the last column.
    coefs = cols[3] / ops.square(norm_w + eps)
    channels = layout.num_channels
    # coef = channel coefs if channel_wise else (layer coef if layer_wise else 0)
    coef = ops.where(
        channel_wise,
        coefs[:channels],
        ops.where(layer_wise, coefs[channels], ops.zeros_like(coefs[channels])),
    )
    # ratio = wd_ratio if projected else 1
    ratio = ops.where(
        ops.logical_or(channel_wise, layer_wise),
        ops.cast(wd_ratio, u_view.dtype),
        ops.cast(1.0, u_view.dtype),
    )
    return _channel_column(coef, layout), ratio


def scale_invariance(w, g, layout, delta, eps):
    """Which view of `w` the projection would act on for gradient `g`.

    Returns:
        An int32 scalar tensor: ``CHANNEL_WISE`` (1), ``LAYER_WISE`` (2) or
        ``NOT_PROJECTED`` (0).
    """
    w, g = _views(layout, w.dtype, w, g)
    sums = _channel_sums(w, g, None, layout)
    channel_wise, layer_wise, _, _ = _decide(sums, layout, delta, eps)
    # CHANNEL_WISE if channel_wise else LAYER_WISE if layer_wise else NOT_PROJECTED
    return ops.where(
        channel_wise,
        CHANNEL_WISE,
        ops.where(layer_wise, LAYER_WISE, NOT_PROJECTED),
    )


def cosines(w, g, layout, eps):
    """The cosines the test compares with its thresholds.

    Returns:
        ``(channel_cos, layer_cos)``: |cos(g_c, w_c)| per output channel, shape
        ``(num_channels,)``, and |cos(g, w)| of the whole tensor, computed as
        the optimizer computes them (float32 for 16-bit variables).
    """
    w, g = _views(layout, w.dtype, w, g)
    _, _, cos = _columns(_channel_sums(w, g, None, layout), eps)
    return cos[: layout.num_channels], cos[layout.num_channels]
