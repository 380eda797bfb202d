"""Which axes of a Keras variable are its output channels, and the view of
the variable that makes every per-channel sum one reduction.

AdamP, SGDP and the spherical optimizers all work on groups of a kernel's
elements: one group per output channel (or the whole tensor as one group).
PyTorch groups a weight by axis 0; Keras puts the output channel elsewhere
(last for Dense and Conv, the last two axes of a depthwise kernel, the rows
of an Embedding, axes (1, 2) of an attention query kernel). This module holds
those facts and nothing of the optimizers' math:

* :class:`ChannelLayout`: a variable's shape grouped by a set of output axes
  (contiguous or not), as a view in which each group is summed by one
  reduction (:meth:`ChannelLayout.group_sum`) and a per-group value broadcasts
  back over the view (:meth:`ChannelLayout.per_element`).
* :func:`default_channel_axes`: the static rules (shape and variable name).
* :func:`validate_channel_axes` and :func:`resolve_channel_axes`: the
  ``channel_axes={pattern: axes}`` override of the optimizers.
* :func:`channel_axes_for`: the override for a whole model, taken from each
  variable's owning layer (its type and config) instead of guessed.
* :func:`channel_layout`: the layout an optimizer (or the optimizer inside a
  ``LossScaleOptimizer``) uses for a variable.
"""

import dataclasses
import math
import re
import warnings

import keras
from keras import ops


@dataclasses.dataclass(frozen=True)
class ChannelLayout:
    """How a variable of a given shape is grouped into output channels.

    The variable is viewed as ``view``: runs of neighbouring axes that are all
    output-channel axes, or all not, are merged into one axis each (reshaping
    is free, and a reduction over one merged axis is cheaper than over
    several). The merged non-channel axes, ``reduce_axes`` of the view, are
    summed within a group; what is left indexes the ``num_channels`` groups.
    Output axes need not be contiguous: a Gemma-style query kernel
    ``(heads, d, head_dim)`` with output axes ``(0, 2)`` is viewed as is and
    reduced over axis 1, with no transpose.

    Attributes:
        shape: The variable's shape.
        channel_axes: Non-negative, sorted axes of the variable that index its
            output channels. Empty means the whole tensor is one group.
        view: The shape the variable is reshaped to.
        reduce_axes: The axes of ``view`` summed within one output channel.
        group_size: Number of elements in one output channel.
        num_channels: Number of output channels.
        channel_view: The shape a ``(num_channels,)`` tensor takes to broadcast
            against ``view`` (leading ones dropped).
    """

    shape: tuple
    channel_axes: tuple
    view: tuple
    reduce_axes: tuple
    group_size: int
    num_channels: int
    channel_view: tuple

    @classmethod
    def create(cls, shape, channel_axes):
        """Builds the layout of a variable of `shape` grouped by `channel_axes`.

        Args:
            shape: The variable's static shape (a tuple of ints).
            channel_axes: The axes that index an output channel: an int, a
                sequence of ints (negative ones count from the end; they need
                not be contiguous), or an empty sequence for a single group
                (the whole tensor).

        Raises:
            ValueError: if an axis is out of range or repeated.
        """
        shape = tuple(int(d) for d in shape)
        axes = _normalize_axes(channel_axes, shape)
        numel = math.prod(shape)
        if not axes:
            # One group: a single column, summed over its rows.
            return cls(shape, (), (numel, 1), (0,), numel, 1, (1,))
        # Runs of neighbouring axes with the same membership, merged.
        runs = []  # [is_channel, size]
        for axis, size in enumerate(shape):
            member = axis in axes
            if runs and runs[-1][0] == member:
                runs[-1][1] *= size
            else:
                runs.append([member, size])
        # A non-channel run of size 1 sums nothing: drop it from the view.
        runs = [run for run in runs if run[0] or run[1] != 1]
        if all(member for member, _ in runs):
            runs.insert(0, [False, 1])  # every axis is a channel: groups of 1
        view = tuple(size for _, size in runs)
        reduce_axes = tuple(i for i, (member, _) in enumerate(runs) if not member)
        channels = math.prod(size for member, size in runs if member)
        # Not numel // channels: a zero-size variable can have no channels.
        group_size = math.prod(size for member, size in runs if not member)
        broadcast = [size if member else 1 for member, size in runs]
        while len(broadcast) > 1 and broadcast[0] == 1:
            broadcast.pop(0)
        return cls(
            shape,
            axes,
            view,
            reduce_axes,
            group_size,
            channels,
            tuple(broadcast),
        )

    @property
    def numel(self):
        return self.group_size * self.num_channels

    def to_view(self, x):
        """`x` (of the variable's shape) reshaped to ``view``; no op if it is
        already of that shape."""
        if tuple(x.shape) == self.view:
            return x
        return ops.reshape(x, self.view)

    def group_sum(self, x):
        """Sums a tensor of shape ``view`` within each group: ``(num_channels,)``."""
        total = ops.sum(x, axis=self.reduce_axes)
        if len(self.view) - len(self.reduce_axes) > 1:  # several channel runs
            total = ops.reshape(total, (self.num_channels,))
        return total

    def per_element(self, c):
        """A ``(num_channels,)`` tensor shaped to broadcast against ``view``."""
        if self.channel_view == (self.num_channels,):
            return c
        return ops.reshape(c, self.channel_view)


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
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"Channel axes {tuple(channel_axes)} repeat an axis of a variable of "
            f"shape {shape}."
        )
    return tuple(sorted(axes))


def is_bias(name):
    """Whether a variable named `name` (its own name, the last part of its
    path) is a bias: ``bias`` or ``*_bias``. Biases are never projected,
    whatever their rank (an EinsumDense bias is ``(heads, head_dim)``): in
    PyTorch every bias is 1-D and the reference never projects one."""
    return name == "bias" or name.endswith("_bias")


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
    * The LoRA factors that ``enable_lora`` adds to ``Dense``, ``EinsumDense``,
      ``Conv1D/2D/3D`` and ``Embedding`` (:data:`LORA_NAMES`): the last axis.
    * Biases (:func:`is_bias`) and variables of rank <= 1: never projected.

    Shape and name cannot tell a ``Conv*Transpose`` kernel ``(*k, out, in)``
    from a ``Conv`` one, nor see an ``EinsumDense`` equation or a depth
    multiplier > 1; :func:`channel_axes_for` reads those from the layers.

    Args:
        shape: The variable's shape.
        name: The variable's own name (the last part of its path), or None.

    Returns:
        A tuple of axes, or None for a variable that is never projected.
    """
    ndim = len(shape)
    if ndim <= 1 or (name is not None and is_bias(name)):
        return None
    if name in LORA_NAMES:
        return (ndim - 1,)
    if name == "embeddings" and ndim == 2:
        return (0,)
    if name == "depthwise_kernel" or (ndim >= 3 and shape[-1] == 1):
        return (ndim - 2, ndim - 1)
    return (ndim - 1,)


#: The variables ``enable_lora(rank)`` adds: ``lora_kernel_a``
#: ``(*kernel_shape[:-1], rank)`` and ``lora_kernel_b`` ``(rank, out)`` of
#: Dense, EinsumDense and Conv1D/2D/3D, ``lora_embeddings_a`` ``(vocab, rank)``
#: and ``lora_embeddings_b`` ``(rank, dim)`` of Embedding. The kernel they
#: stand for is ``a @ b``; each is grouped by its last axis, as peft's
#: ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)`` are by axis 0.
LORA_NAMES = (
    "lora_kernel_a",
    "lora_kernel_b",
    "lora_embeddings_a",
    "lora_embeddings_b",
)

# Words in a variable's path that mark a kernel whose output axes the static
# rules cannot know: a transposed convolution (its kernel is (*k, out, in)),
# a depthwise one (depth multiplier > 1 is read as a Conv), attention and
# EinsumDense kernels (their output axes come from an equation).
_AMBIGUOUS_PATH_WORDS = (
    "transpose",
    "depthwise",
    "einsum",
    "attention",
    "query",
    "key",
    "value",
)
# No Keras convolution kernel has a spatial extent above this; an
# EinsumDense kernel (d_model, heads, head_dim) read as a Conv1D would.
_MAX_CONV_EXTENT = 32


def static_rule_is_a_guess(shape, path):
    """Whether :func:`default_channel_axes` only guesses this variable's
    grouping (its rank >= 2 and no rule is sure of it).

    Sure: any rank-2 variable (a matrix ``(in, out)`` as Dense's, or
    ``embeddings``), ``depthwise_kernel``, ``pointwise_kernel``, the LoRA
    factors (:data:`LORA_NAMES`), and a rank 3-5 ``kernel`` that looks like
    a Conv's (spatial extents <= 32, a last axis longer than 1, no word in
    its path that names a transposed, depthwise, attention or EinsumDense
    layer), or a depthwise one (last axis 1, "depthwise" in its path).
    Everything else is a guess: custom variables of rank >= 3, a
    ``kernel`` of rank > 5, shapes a Conv cannot have, rank-3 EinsumDense-like
    kernels, and a 1-filter Conv read as depthwise.
    """
    ndim = len(shape)
    name = path.split("/")[-1]
    if ndim <= 2 or is_bias(name):
        return False
    if name in ("depthwise_kernel", "pointwise_kernel") or name in LORA_NAMES:
        return False
    if name != "kernel" or ndim > 5:
        return True
    words = [w for w in _AMBIGUOUS_PATH_WORDS if w in path.lower()]
    if shape[-1] == 1:
        return words != ["depthwise"]
    return bool(words) or any(d > _MAX_CONV_EXTENT for d in shape[:-2])


def channel_axes_config(channel_axes):
    """A validated ``channel_axes`` as stored in an optimizer's config (JSON:
    lists, not tuples)."""
    if channel_axes is None:
        return None
    return {pattern: list(axes) for pattern, axes in channel_axes.items()}


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


def resolve_channel_axes(
    variables, channel_axes=None, warn=True, owner=None, grouped=None
):
    """The layout of each variable: the override if a pattern matches, else
    :func:`default_channel_axes`.

    Args:
        variables: The variables the optimizer is built on.
        channel_axes: ``{pattern: axes}``; a pattern is a regular expression
            searched (``re.search``) in the variable's path, the first matching
            pattern wins. Biases (:func:`is_bias`) are never matched: they are
            never projected.
        warn: Emit the warnings below (one of each kind at most).
        owner: Who asks (e.g. an optimizer's class name), for the warnings.
        grouped: Per variable, whether its grouping is used (default: all
            are). A guessed grouping is warned about only where it is: the
            spherical optimizers step the variables they do not designate as
            plain SGD/Adam, whatever their layout.

    Returns:
        A list with, per variable, a :class:`ChannelLayout` or None (rank <= 1,
        a bias or zero-size: never projected).

    Warns:
        UserWarning: once, naming the variables whose grouping the static
            rules only guess (:func:`static_rule_is_a_guess`) and no pattern
            covers, and the fix (:func:`channel_axes_for`). Once, naming the
            patterns that match none of `variables`: they are ignored. When
            fine-tuning, the layers a pattern names may be frozen, and an
            optimizer is built on the trainable variables only, so such a
            pattern cannot be told from a typo; the warning lists the
            variables it could have matched.

    Raises:
        ValueError: if a pattern's axes do not fit a variable it matches (the
            message names both).
    """
    channel_axes = channel_axes or {}
    compiled = [(p, re.compile(p), axes) for p, axes in channel_axes.items()]
    used = set()
    guessed = []
    layouts = []
    for index, variable in enumerate(variables):
        shape = tuple(variable.shape)
        path = variable_path(variable)
        if len(shape) <= 1 or is_bias(path.split("/")[-1]):
            layouts.append(None)
            continue
        axes = None
        for pattern, regex, pattern_axes in compiled:
            if regex.search(path):
                axes = pattern_axes
                used.add(pattern)
                break
        if axes is None:
            axes = default_channel_axes(shape, path.split("/")[-1])
            # (A zero-size variable is never projected: nothing to guess.)
            used_here = grouped is None or grouped[index]
            if used_here and math.prod(shape) and static_rule_is_a_guess(shape, path):
                guessed.append(f"'{path}' {shape} -> axes {axes}")
        try:
            layout = ChannelLayout.create(shape, axes)
        except ValueError as error:
            raise ValueError(f"Variable '{path}': {error}") from None
        # A zero-size variable has nothing to project (and its groups no
        # threshold: delta / sqrt(0)); its step is the base optimizer's no-op.
        layouts.append(layout if layout.numel else None)
    who = f"{owner}: " if owner else ""
    unused = [p for p in channel_axes if p not in used]
    if unused and warn:
        known = ", ".join(
            f"'{variable_path(v)}' {tuple(v.shape)}"
            for v, layout in zip(variables, layouts)
            if layout is not None
        )
        warnings.warn(
            f"{who}`channel_axes` pattern(s) {unused} match no variable of "
            f"rank >= 2 being trained (biases never match); they are ignored. "
            f"Expected when their layers are frozen; otherwise check them "
            f"against the variables: {known or 'none'}.",
            stacklevel=3,
        )
    if guessed and warn:
        warnings.warn(
            f"{who}the output channels of {len(guessed)} variable(s) are "
            f"guessed from their shape and name, which cannot tell a "
            f"Conv*Transpose, an EinsumDense or attention kernel, a depth "
            f"multiplier or a custom layer apart: {'; '.join(guessed)}. To "
            f"take them from the layers, pass "
            f"`channel_axes=keras_adamp.channel_axes_for(model)` (or name "
            f"their axes in `channel_axes`).",
            stacklevel=3,
        )
    return layouts


def variable_path(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.removesuffix(":0")


def channel_axes_for(model):
    """The output-channel axes of every trainable variable of `model`, taken
    from the layer that owns it, as a ``channel_axes`` override::

        optimizer = keras_adamp.AdamP(channel_axes=keras_adamp.channel_axes_for(model))

    The layer tree is walked (``Model.layers``, and the layers a layer holds
    as attributes, so Sequential, functional, subclassed and nested models and
    keras-hub backbones alike) and each variable is matched to its owner by
    identity. Rules, from the layer's type and config:

    * ``Dense``, ``Conv1D/2D/3D`` (any ``groups``), RNN cells (``kernel``,
      ``recurrent_kernel``), ``SeparableConv*`` ``pointwise_kernel``: last axis.
    * ``Conv1D/2D/3DTranspose`` ``(*k, out, in)``: axis -2, the output channel
      (the reference groups torch's ``(in, out, *k)`` weight by *input*
      channel: a documented difference).
    * ``DepthwiseConv1D/2D`` ``kernel`` and ``SeparableConv*``
      ``depthwise_kernel`` ``(*k, C, M)``: the last two axes, any depth
      multiplier.
    * ``EinsumDense`` (so ``MultiHeadAttention`` and the attention layers
      built from it): the kernel axes whose letters appear in the equation's
      output, e.g. ``abc,cde->abde`` gives ``(1, 2)``, ``btd,ndh->btnh``
      gives ``(0, 2)``.
    * ``Embedding`` ``embeddings`` and keras-hub's ``PositionEmbedding``
      ``embeddings`` ``(sequence_length, dim)``: axis 0.
      ``ReversibleEmbedding`` ``reverse_embeddings`` ``(dim, vocab)``
      (untied): last axis.
    * LoRA (``enable_lora(rank)`` on ``Dense``, ``EinsumDense``,
      ``Conv1D/2D/3D``, ``Embedding``): ``lora_kernel_a``
      ``(*kernel_shape[:-1], rank)``, ``lora_kernel_b`` ``(rank, out)``,
      ``lora_embeddings_a`` ``(vocab, rank)``, ``lora_embeddings_b``
      ``(rank, dim)``: last axis (peft's ``lora_A`` ``(rank, in)`` and
      ``lora_B`` ``(out, rank)``, grouped by axis 0).
    * Biases and variables of rank <= 1: left out (never projected).

    A variable of another layer whose leading axes all have size 1 (a class
    token ``(1, 1, D)``) is one group, ``[]``, as the reference groups the
    same parameter. Other variables of other layers get
    :func:`default_channel_axes`, with one warning naming them.

    Returns:
        A dict ``{"^<escaped path>$": [axes]}``, one entry per trainable
        variable of rank >= 2 that is not a bias, in
        ``model.trainable_variables`` order: JSON-serializable, so it is
        stored in the optimizer's config and survives ``.keras`` saving.

    Raises:
        ValueError: if two trainable variables share a path but not their
            axes (a path pattern cannot tell them apart: rename a layer).
    """
    owners = _variable_owners(model)
    result = {}
    unknown = []
    for variable in model.trainable_variables:
        shape = tuple(variable.shape)
        path = variable_path(variable)
        name = path.split("/")[-1]
        if len(shape) <= 1 or is_bias(name):
            continue
        owner = owners.get(id(variable), model)
        axes = _layer_channel_axes(owner, name, len(shape))
        if axes is None and all(d == 1 for d in shape[:-1]):
            # (1, ..., 1, D), a class token: the reference groups the same
            # parameter by its axis 0, one group. Any grouping of its last
            # axis decides alike except where g * w is 0 everywhere.
            axes = ()
        if axes is None:
            axes = default_channel_axes(shape, name)
            unknown.append(f"'{path}' {shape} of {type(owner).__name__}")
        key = "^" + re.escape(path) + "$"
        if key in result and tuple(result[key]) != tuple(axes):
            raise ValueError(
                f"Two trainable variables share the path '{path}' but not "
                f"their output axes ({tuple(result[key])} and {tuple(axes)}): "
                f"a `channel_axes` pattern cannot tell them apart. Give their "
                f"layers distinct names."
            )
        result[key] = list(axes)
    if unknown:
        warnings.warn(
            f"channel_axes_for: no rule for {len(unknown)} variable(s) of "
            f"layers that are not Keras layers with a kernel; grouped by the "
            f"static rules (keras_adamp.layouts.default_channel_axes): "
            f"{'; '.join(unknown)}. Edit their entries if their output "
            f"channels are elsewhere.",
            stacklevel=2,
        )
    return result


def _sublayers(layer):
    """The layers `layer` holds: ``Model.layers`` (public) and layer-valued
    attributes, lists, tuples and dicts (how Keras tracks sublayers)."""
    found = list(layer.layers) if isinstance(layer, keras.Model) else []
    for value in vars(layer).values():
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, keras.layers.Layer))
        elif isinstance(value, keras.layers.Layer):
            found.append(value)
    return found


def _variable_owners(model):
    """``{id(variable): layer}``: the deepest layer holding each variable.

    Layers are visited children first, and a variable goes to the first
    layer whose ``weights`` contain it, so a parent never claims its
    sublayers' variables.
    """
    owners = {}
    visited = set()

    def visit(layer):
        if id(layer) in visited:
            return
        visited.add(id(layer))
        for child in _sublayers(layer):
            visit(child)
        for variable in layer.weights:
            owners.setdefault(id(variable), layer)

    visit(model)
    return owners


def _einsum_output_axes(equation, ndim):
    """The kernel axes of an EinsumDense `equation` whose letters appear in
    its output, or None if the equation does not read as one."""
    match = re.fullmatch(r"\s*([\w.]+)\s*,\s*(\w+)\s*->\s*([\w.]+)\s*", equation)
    if match is None or len(match.group(2)) != ndim:
        return None
    kernel, output = match.group(2), match.group(3)
    return tuple(i for i, letter in enumerate(kernel) if letter in output)


# The layers whose `enable_lora` adds the variables of LORA_NAMES.
_LORA_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Embedding,
)


def _layer_channel_axes(layer, name, ndim):
    """The output axes of `layer`'s variable `name` (of rank `ndim`), from the
    layer's type and config; None if no rule knows it."""
    last, two_last = (ndim - 1,), (ndim - 2, ndim - 1)
    layers = keras.layers
    if name in LORA_NAMES and isinstance(layer, _LORA_LAYERS):
        return last
    if isinstance(layer, layers.EinsumDense):
        if name == "kernel":
            return _einsum_output_axes(layer.equation, ndim)
        return None
    # Untied output embedding (dim, vocab): logits = x @ it, one per token.
    if isinstance(layer, layers.ReversibleEmbedding) and name == "reverse_embeddings":
        return last
    rules = (
        (
            (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose),
            {"kernel": (ndim - 2,)},
        ),
        ((layers.DepthwiseConv1D, layers.DepthwiseConv2D), {"kernel": two_last}),
        (
            (layers.SeparableConv1D, layers.SeparableConv2D),
            {"depthwise_kernel": two_last, "pointwise_kernel": last},
        ),
        ((layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D), {"kernel": last}),
        ((layers.Embedding,), {"embeddings": (0,)}),
        (
            (layers.SimpleRNNCell, layers.LSTMCell, layers.GRUCell),
            {"kernel": last, "recurrent_kernel": last},
        ),
    )
    for classes, by_name in rules:
        if isinstance(layer, classes):
            return by_name.get(name)
    # keras-hub's learned PositionEmbedding (sequence_length, dim): added to
    # the token embeddings, one row per position, as an Embedding's.
    if name == "embeddings" and ndim == 2 and _has_class(layer, "PositionEmbedding"):
        return (0,)
    # ConvLSTM1D/2D/3D's cell is not exported: (*k, in, 4 * filters).
    if type(layer).__name__ == "ConvLSTMCell" and name in (
        "kernel",
        "recurrent_kernel",
    ):
        return last
    return None


def _has_class(layer, name):
    """Whether `layer` is an instance of a class called `name` (a layer of a
    library this package does not import)."""
    return any(cls.__name__ == name for cls in type(layer).__mro__)


def channel_layout(optimizer, variable):
    """The :class:`ChannelLayout` `optimizer` uses for `variable` (None: never
    projected).

    `optimizer` is an AdamP/SGDP (or any optimizer with a ``channel_layout``
    method), or a ``LossScaleOptimizer`` wrapping one (``compile`` wraps the
    optimizer in one under ``mixed_float16``).

    Raises:
        ValueError: for another optimizer, or a variable the built optimizer
            was not built on.
    """
    inner = projecting_optimizer(optimizer)
    method = getattr(inner, "channel_layout", None)
    if method is None:
        raise ValueError(
            f"{type(inner).__name__} groups no variable by output channel: "
            f"channel layouts are those of keras_adamp's optimizers (AdamP, "
            f"SGDP, Projected), or of a LossScaleOptimizer wrapping one."
        )
    return method(variable)


def projecting_optimizer(optimizer):
    """The optimizer whose channel layouts and test settings apply:
    `optimizer` if it has layouts (AdamP, SGDP, Projected, ...), else the
    optimizer it wraps (a ``LossScaleOptimizer``'s), else `optimizer`."""
    while getattr(optimizer, "channel_layout", None) is None:
        inner = getattr(optimizer, "inner_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer
