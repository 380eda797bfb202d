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
"""

import dataclasses
import math
import re

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
        broadcast = [size if member else 1 for member, size in runs]
        while len(broadcast) > 1 and broadcast[0] == 1:
            broadcast.pop(0)
        return cls(
            shape, axes, view, reduce_axes, numel // channels, channels,
            tuple(broadcast),
        )

    @property
    def numel(self):
        return self.group_size * self.num_channels

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
        path = variable_path(variable)
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
            f"'{variable_path(v)}' {tuple(v.shape)}"
            for v in variables
            if len(v.shape) > 1
        )
        raise ValueError(
            f"`channel_axes` pattern(s) {unused} match no variable of rank >= 2. "
            f"Variables: {known or 'none'}."
        )
    return layouts


def variable_path(variable):
    path = getattr(variable, "path", None) or variable.name
    return path[:-2] if path.endswith(":0") else path
