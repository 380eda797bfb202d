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

Everything here is a pure function of tensors and static shape facts. Which
axes of a variable are its output channels, and the view that makes each
per-channel sum one reduction, is :mod:`keras_adamp.layouts`'s business
(:class:`~keras_adamp.layouts.ChannelLayout`); this module is the math:

* :func:`project` applies the test and the projection in one pass over ``w``,
  ``g`` and ``u``; :func:`scale_invariance` reports the decision alone.

The decision is made on device with ``ops.where``: no Python branch on a tensor
value, so the code compiles under XLA (``jit_compile=True``, ``jax.jit``).
"""

import collections
import functools
import math

import keras
from keras import ops

# The layout names lived here before keras_adamp.layouts; kept importable.
from keras_adamp.layouts import ChannelLayout  # noqa: F401
from keras_adamp.layouts import default_channel_axes  # noqa: F401
from keras_adamp.layouts import resolve_channel_axes  # noqa: F401
from keras_adamp.layouts import validate_channel_axes  # noqa: F401

# What `scale_invariance` returns: which view of the variable passed the test.
NOT_PROJECTED = 0
CHANNEL_WISE = 1
LAYER_WISE = 2

_LOW_PRECISION = ("float16", "bfloat16")


# Backends whose reductions are compiled by XLA (always on JAX; on TensorFlow
# under `jit_compile=True`, and the partial sums cost nothing without it).
_XLA_STYLE_BACKENDS = ("tensorflow", "jax")
# Candidate numbers of row blocks, the first that divides the rows is used.
_BLOCKS = (4, 2)


@functools.cache
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


def _reshaped(x, shape):
    if x is None or tuple(x.shape) == tuple(shape):
        return x
    return ops.reshape(x, shape)


def _channel_sums(w, g, u, layout, blocks=True):
    """Per-channel <g,w>, <g,g>, <w,w> and, if `u` is given, <w,u>, stacked into
    one `(3 or 4, num_channels)` tensor, for tensors of the variable's shape
    or of `layout.view`.

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
    one loop, or more than 4 blocks, measured slower.) The blocks' sums are
    buffers of `4 / k` times the variable's size (XLA on CPU materialises
    each block's products too); `blocks=False` reduces directly.
    """
    pairs = [(g, w), (g, g), (w, w)]
    if u is not None:
        pairs.append((w, u))
    return ops.stack(_pair_sums(pairs, layout, blocks))


def _pair_sums(pairs, layout, blocks=True):
    """Per-channel ``<a, b>`` of each pair `(a, b)` of tensors of the
    variable's shape or of `layout.view`, each of shape `(C,)`, taken as
    `_channel_sums` describes (in row blocks where `blocks` and the layout
    allow)."""
    k = _block_count(layout) if blocks else 1
    shape = None if k == 1 else (k, layout.view[0] // k, layout.num_channels)
    cut = {}

    def pieces(x):
        # The view (k == 1) or a list of k slices x[0], ..., x[k-1]; once
        # per tensor, however many pairs it is in.
        if id(x) not in cut:
            if k == 1:
                cut[id(x)] = layout.to_view(x)
            else:
                cut[id(x)] = ops.unstack(_reshaped(x, shape), num=k, axis=0)
        return cut[id(x)]

    sums = []
    for a, b in pairs:
        a, b = pieces(a), pieces(b)
        if k == 1:
            sums.append(_replicated(layout.group_sum(a * b)))
            continue
        total = a[0] * b[0]
        for i in range(1, k):
            total = total + a[i] * b[i]
        sums.append(_replicated(ops.sum(total, axis=0)))
    return sums


def _replicated(x):
    """`x`, a per-channel sum, constrained to be replicated on every device
    of a JAX `keras.distribution` mesh (no op elsewhere).

    Sharding propagation otherwise gives the stacked sums of a kernel a
    sharding derived from the kernel's (and, in the batched decision, from
    its neighbours'), which XLA's SPMD partitioner can only reach by
    replicating the tensor and partitioning it again ("Involuntary full
    rematerialization", printed for a Gemma layout map). A sum over a
    sharded axis is all-reduced anyway; a replicated one costs at most an
    all-gather of one value per channel, and the results are the same.
    """
    dist = keras.distribution.distribution()
    if dist is None or keras.backend.backend() != "jax":
        return x
    layout = keras.distribution.TensorLayout((None,) * len(x.shape), dist.device_mesh)
    return keras.distribution.distribute_tensor(x, layout)


def _decide(layouts, sums, delta, eps):
    """The test for several variables at once, on their stacked channel sums.

    The channel sums of all variables are laid side by side, then one layer
    column per variable (the sum of its channel sums: no second pass over the
    variable), so that the cosines and the projection coefficients of every
    view of every variable are one set of small ops on ``N + V`` columns
    (``N`` channels in all, ``V`` variables) instead of one set per variable.

    Args:
        layouts: The variables' :class:`ChannelLayout`.
        sums: Per variable, its `_channel_sums` `(n, num_channels)`, all of
            one dtype.

    Returns:
        ``(channel_wise, layer_wise, cols, norm_w)``: booleans of shape
        ``(V,)``, the `(n, N + V)` columns and ``sqrt(<w,w>)`` per column.
    """
    channels = sum(layout.num_channels for layout in layouts)
    layer = [ops.sum(s, axis=1, keepdims=True) for s in sums]
    cols = ops.concatenate(sums + layer, axis=1)
    norm_w, cos = _columns(cols, eps)
    passes = cos < ops.convert_to_tensor(
        _thresholds(tuple(layouts), delta), dtype=cos.dtype
    )
    layer_wise = passes[channels:]
    if len(layouts) == 1:
        channel_wise = ops.expand_dims(ops.all(passes[:channels]), 0)
    else:
        # Failing channels per variable, as differences of a running count
        # over all channels (exact: whole numbers far below 2**24).
        fails = ops.cumsum(ops.cast(ops.logical_not(passes[:channels]), "float32"))
        fails = ops.pad(fails, [(1, 0)])
        ends = _boundaries(tuple(layouts))
        channel_wise = ops.equal(ops.take(fails, ends[1:]), ops.take(fails, ends[:-1]))
    return channel_wise, layer_wise, cols, norm_w


@functools.lru_cache(maxsize=64)
def _thresholds(layouts, delta):
    """The test's threshold per column of `_decide`: ``delta / sqrt(group
    size)`` for each channel, then ``delta / sqrt(numel)`` per variable."""
    channel = [
        delta / math.sqrt(layout.group_size)
        for layout in layouts
        for _ in range(layout.num_channels)
    ]
    return channel + [delta / math.sqrt(layout.numel) for layout in layouts]


@functools.lru_cache(maxsize=64)
def _boundaries(layouts):
    """Where each variable's channels start among all channels, and the end."""
    ends = [0]
    for layout in layouts:
        ends.append(ends[-1] + layout.num_channels)
    return ends


@functools.lru_cache(maxsize=64)
def _owners(layouts):
    """The index of the variable each channel column belongs to."""
    return [v for v, layout in enumerate(layouts) for _ in range(layout.num_channels)]


def _columns(cols, eps):
    """||w|| and |cos(g, w)| per column of the sums `(n, columns)` (as
    torch.nn.functional.cosine_similarity: each norm clamped below at eps)."""
    norm_w = ops.sqrt(cols[2])
    cos = ops.abs(cols[0]) / (
        ops.maximum(ops.sqrt(cols[1]), eps) * ops.maximum(norm_w, eps)
    )
    return norm_w, cos


def _is_low_precision(dtype):
    return keras.backend.standardize_dtype(dtype) in _LOW_PRECISION


def _in_float32(dtype, *tensors):
    """The tensors, in float32 if `dtype` is 16-bit.

    Norms and cosines of 16-bit variables are computed in float32: a float16
    <w,w> overflows at ||w|| > 256, and bfloat16 sums lose the decision.
    """
    tensors = [ops.convert_to_tensor(x) for x in tensors]
    if not _is_low_precision(dtype):
        return tensors
    return [ops.cast(x, "float32") for x in tensors]


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
    sums = channel_sums(w, g, u, layout)
    [(coef, ratio)] = coefficients([layout], [sums], delta, wd_ratio, eps)
    return remove_radial(w, u, coef, layout), ops.cast(ratio, u.dtype)


def remove_radial(w, u, coef, layout):
    """``u - w * coef`` per channel, of `u`'s shape and dtype (computed in
    float32 for 16-bit `u`), for a `(C,)` `coef` from :func:`coefficients`."""
    dtype = ops.convert_to_tensor(u).dtype
    w, u = _in_float32(dtype, w, u)
    return ops.cast(per_channel(lambda w, u, c: u - w * c, coef, layout, w, u), dtype)


def per_channel(fn, coef, layout, *tensors):
    """``fn(*tensors, c)`` for tensors of the variable's shape, with `c` the
    `(C,)` `coef` shaped to broadcast against them; in `layout.view` (and
    back) only where the output axes are not the trailing ones (an
    Embedding's rows), elsewhere on the tensors as they are (fewer ops)."""
    shape = _trailing_channels(layout)
    if shape is None:
        views = [ops.reshape(x, layout.view) for x in tensors]
        return ops.reshape(fn(*views, layout.per_element(coef)), layout.shape)
    if tuple(coef.shape) != shape:
        coef = ops.reshape(coef, shape)
    return fn(*tensors, coef)


@functools.cache
def _trailing_channels(layout):
    """The shape a `(C,)` tensor takes to broadcast against the variable's own
    shape, or None if its output axes are not the trailing ones."""
    rank = len(layout.shape)
    first = rank - len(layout.channel_axes)
    if layout.channel_axes != tuple(range(first, rank)):
        return None
    shape = layout.shape[first:]
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape or (1,)


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
    sums = channel_sums(w, g, u, layout)
    [(coef, ratio)] = coefficients([layout], [sums], delta, wd_ratio, eps)
    return layout.per_element(coef), ratio


def channel_sums(w, g, u, layout):
    """The per-channel <g,w>, <g,g>, <w,w>, <w,u> of one variable, `(4, C)`
    (float32 for 16-bit `u`): all :func:`coefficients` needs of it."""
    return _channel_sums(*_in_float32(u.dtype, w, g, u), layout)


def _outcome(layouts, sums, delta, wd_ratio, eps):
    """What `_decide` concludes, in the terms the coefficients need:
    ``(channel_wise, layer_only, denominator, ratio, cols)``, `layer_only`
    the variables projected as a whole (not channel-wise), `denominator`
    ``(||w|| + eps)^2`` per column of `cols` and `ratio` the decay ratio per
    variable (`wd_ratio` if a view passed, else 1)."""
    channel_wise, layer_wise, cols, norm_w = _decide(layouts, sums, delta, eps)
    layer_only = ops.logical_and(layer_wise, ops.logical_not(channel_wise))
    ratio = ops.where(
        ops.logical_or(channel_wise, layer_wise),
        ops.cast(wd_ratio, cols.dtype),
        ops.cast(1.0, cols.dtype),
    )
    return channel_wise, layer_only, ops.square(norm_w + eps), ratio, cols


def coefficients(layouts, sums, delta, wd_ratio, eps):
    """The projection of several variables decided in one set of small ops.

    Args:
        layouts: Per variable, its :class:`ChannelLayout`.
        sums: Per variable, its :func:`channel_sums`, all of one dtype.

    Returns:
        Per variable, ``(coef, decay_ratio)`` as :func:`radial_coefficients`,
        but `coef` of shape `(num_channels,)` (see :func:`per_channel`).
    """
    layouts = tuple(layouts)
    channel_wise, layer_only, denominator, ratio, cols = _outcome(
        layouts, sums, delta, wd_ratio, eps
    )
    channels = len(_owners(layouts))
    # <w,u> / (||w|| + eps)^2 per channel, then per variable for the layer.
    coefs = cols[3] / denominator
    layer = ops.where(layer_only, coefs[channels:], ops.zeros_like(coefs[channels:]))
    # coef = channel coefs if channel_wise else (layer coef if layer_wise else 0)
    if len(layouts) == 1:
        coef = ops.where(channel_wise, coefs[:channels], layer)
        return [(coef, ratio[0])]
    owners = _owners(layouts)
    coef = ops.where(
        ops.take(channel_wise, owners), coefs[:channels], ops.take(layer, owners)
    )
    coef = ops.split(coef, _boundaries(layouts)[1:-1])
    return list(zip(coef, ops.unstack(ratio, num=len(layouts))))


def test_sums(w, g, layout, blocks=True):
    """The per-channel <g,w>, <g,g>, <w,w> of one variable, `(3, C)`
    (float32 for 16-bit `w`): what :func:`decisions` needs of it, known
    before the update is (`blocks`: as :func:`_channel_sums`)."""
    return _channel_sums(*_in_float32(w.dtype, w, g), None, layout, blocks)


def radial_sums(w, u, layout, blocks=True):
    """The per-channel <w,u> of one variable, `(C,)` (float32 for 16-bit
    `u`): what :func:`decided_coefficients` needs of its update."""
    w, u = _in_float32(u.dtype, w, u)
    return _pair_sums([(w, u)], layout, blocks)[0]


Decision = collections.namedtuple(
    "Decision",
    ["channel_wise", "layer_only", "channel_denominator", "layer_denominator", "ratio"],
)
Decision.__doc__ = """The test's outcome for one variable, as :func:`decisions` gives it:
which view passed (`channel_wise`; `layer_only`: the whole tensor and not
every channel), ``(||w|| + eps)^2`` of the channels `(C,)` and of the
tensor, and the decay ratio (`wd_ratio` if a view passed, else 1)."""


def decisions(layouts, sums, delta, wd_ratio, eps):
    """The test of several variables decided in one set of small ops, before
    their updates are known (the test reads only `g` and `w`).

    :func:`coefficients` decides and computes the coefficients together,
    which needs every variable's update at once; deciding first lets each
    variable's coefficient follow from its own update alone
    (:func:`decided_coefficients`), so that a step need not hold all the
    updates until the last one is known.

    Args:
        layouts: Per variable, its :class:`ChannelLayout`.
        sums: Per variable, its :func:`test_sums`, all of one dtype.

    Returns:
        Per variable, a :class:`Decision`.
    """
    layouts = tuple(layouts)
    channel_wise, layer_only, denominator, ratio, _ = _outcome(
        layouts, sums, delta, wd_ratio, eps
    )
    channels = len(_owners(layouts))
    count = len(layouts)
    if count == 1:
        per_channel = [denominator[:channels]]
    else:
        per_channel = ops.split(denominator[:channels], _boundaries(layouts)[1:-1])
    return [
        Decision(*fields)
        for fields in zip(
            ops.unstack(channel_wise, num=count),
            ops.unstack(layer_only, num=count),
            per_channel,
            ops.unstack(denominator[channels:], num=count),
            ops.unstack(ratio, num=count),
        )
    ]


def decided_coefficients(decision, wu):
    """A variable's coefficients, `(C,)` (see :func:`per_channel`), from its
    :class:`Decision` and :func:`radial_sums` `wu`: the same values as
    :func:`coefficients`' for the same sums."""
    layer = ops.where(
        decision.layer_only,
        ops.sum(wu) / decision.layer_denominator,
        ops.zeros_like(decision.layer_denominator),
    )
    return ops.where(decision.channel_wise, wu / decision.channel_denominator, layer)


def scale_invariance(w, g, layout, delta, eps):
    """Which view of `w` the projection would act on for gradient `g`.

    Returns:
        An int32 scalar tensor: ``CHANNEL_WISE`` (1), ``LAYER_WISE`` (2) or
        ``NOT_PROJECTED`` (0).
    """
    sums = test_sums(w, g, layout)
    channel_wise, layer_wise, _, _ = _decide((layout,), [sums], delta, eps)
    # CHANNEL_WISE if channel_wise else LAYER_WISE if layer_wise else NOT_PROJECTED
    return ops.where(
        channel_wise[0],
        CHANNEL_WISE,
        ops.where(layer_wise[0], LAYER_WISE, NOT_PROJECTED),
    )


def cosines(w, g, layout, eps):
    """The cosines the test compares with its thresholds.

    Returns:
        ``(channel_cos, layer_cos)``: |cos(g_c, w_c)| per output channel, shape
        ``(num_channels,)``, and |cos(g, w)| of the whole tensor, computed as
        the optimizer computes them (float32 for 16-bit variables).
    """
    sums = test_sums(w, g, layout)
    cols = ops.concatenate([sums, ops.sum(sums, axis=1, keepdims=True)], axis=1)
    _, cos = _columns(cols, eps)
    return cos[: layout.num_channels], cos[layout.num_channels]
