"""What AdamS, AdamSRT and SGDMRT share: which variables are *designated*
(treated on the sphere, one group per output channel or one for the whole
tensor), the per-variable static plan made in `build`, and the moments'
transport to the new point of the sphere.

The seed paper (Roburin et al., "A spherical analysis of Adam with Batch
Normalization") works on the weights that a normalization layer makes
scale-invariant: the kernel of a layer whose output feeds BatchNorm (each
output channel lives on its own sphere) or LayerNorm / GroupNorm (the whole
kernel does). Which variables those are is a fact about the model's graph,
not about a variable's shape, so the optimizers take it as an argument,
`spherical`, and :func:`normalized_kernels` computes the paper's set for a
functional or Sequential Keras model.

Notation of the rules (ALGORITHM.md, "The spherical optimizers"): for a group
``c`` of a designated variable, ``<a, b>_c`` is the sum of ``a * b`` over the
group and ``d`` its size; :class:`keras_adamp.layouts.ChannelLayout` does the
grouping (``group_sum``) and the broadcast back (``per_element``).
"""

import itertools
import math
import re
import warnings

import keras

from keras_adamp import layouts
from keras_adamp._base import StepOptimizer
from keras_adamp._base import _VariablePlan
from keras_adamp._base import check_range

#: The `spherical` value that designates nothing (and says so: no warning).
NONE = ()

_HOW_TO_DESIGNATE = (
    "pass `spherical=keras_adamp.normalized_kernels(model)` (the kernels "
    "followed by BatchNorm, LayerNorm or GroupNorm, the paper's set), a "
    "regular expression searched in variable paths, a list of variables or a "
    "callable `variable -> bool`; `spherical=[]` designates none, silently"
)


def _paths_regex(chosen, universe):
    """A regular expression that matches the paths of the `chosen` variables
    and of no other variable of `universe`, and keeps matching after a
    `.keras` round trip.

    A variable's path is not stable: a Sequential model's layers are built
    under its name (`sequential/conv2d/kernel`), the same layers loaded from
    a `.keras` file are not (`conv2d/kernel`). So each variable is matched by
    the shortest tail of its path, at least `layer/variable`, that no other
    variable's path ends with (layer names are unique within a model):
    `(?:^|/)(?:conv2d/kernel|...)$`.
    """
    if not chosen:
        return NONE
    chosen_ids = {id(v) for v in chosen}
    others = [layouts.variable_path(v) for v in universe if id(v) not in chosen_ids]
    tails = []
    for v in chosen:
        parts = layouts.variable_path(v).split("/")
        for k in range(min(2, len(parts)), len(parts) + 1):
            tail = "/".join(parts[-k:])
            if not any(o == tail or o.endswith("/" + tail) for o in others):
                break
        tails.append(tail)
    return "(?:^|/)(?:" + "|".join(re.escape(t) for t in tails) + ")$"


def validate_spherical(spherical):
    """Checks a `spherical` argument before any variable is seen.

    Returns None (the default: nothing designated, with a warning at build),
    `NONE` (an empty list or tuple: nothing, silently), a regex string, the
    callable unchanged, or a list of variables as a tuple. `build` turns a
    callable or a list into the regex of the paths chosen (`_paths_regex`),
    which the optimizer's config can store.
    """
    if spherical is None or callable(spherical):
        return spherical
    if isinstance(spherical, str):
        try:
            re.compile(spherical)
        except re.error as error:
            raise ValueError(
                f"`spherical` is not a valid regular expression: {error}. "
                f"Received: spherical={spherical!r}"
            ) from None
        return spherical
    if isinstance(spherical, (list, tuple)):
        for v in spherical:
            if (
                isinstance(v, str)
                or not hasattr(v, "shape")
                or not (getattr(v, "path", None) or getattr(v, "name", None))
            ):
                raise ValueError(
                    "`spherical` as a list must hold variables (a regular "
                    "expression is given as one string). Received an element "
                    f"{v!r} in spherical={spherical!r}"
                )
        return tuple(spherical)
    raise ValueError(
        "`spherical` must be None, a regular expression (str), a list of "
        f"variables or a callable `variable -> bool`. Received: "
        f"spherical={spherical!r}"
    )


def designated_mask(variables, spherical):
    """Per variable of `variables`, whether `spherical` (as returned by
    `validate_spherical`) designates it."""
    if spherical is None or (isinstance(spherical, tuple) and not spherical):
        return [False] * len(variables)
    if isinstance(spherical, str):
        pattern = re.compile(spherical)
        mask = [bool(pattern.search(layouts.variable_path(v))) for v in variables]
        if not any(mask):
            raise ValueError(
                f"`spherical` {spherical!r} matches no variable. Variables: "
                + ", ".join(repr(layouts.variable_path(v)) for v in variables)
            )
        return mask
    if isinstance(spherical, tuple):  # variables, by identity
        chosen = {id(v) for v in spherical}
        mask = [id(v) in chosen for v in variables]
        missing = len(chosen) - sum(mask)
        if missing:
            raise ValueError(
                f"`spherical`: {missing} of the variables given are not among "
                "the variables the optimizer is built on."
            )
        return mask
    mask = []
    for v in variables:
        answer = spherical(v)
        if not isinstance(answer, bool):
            raise ValueError(
                "`spherical`, a callable, must return a bool per variable. "
                f"Received {answer!r} for '{layouts.variable_path(v)}'."
            )
        mask.append(answer)
    return mask


class SphericalOptimizer(StepOptimizer):
    """Base of AdamS, AdamSRT and SGDMRT: not for direct use.

    There is no decision to make (`_sums` is None): each variable's update is
    `_assign`. Keras's own weight decay applies, before the update.
    """

    # What a variable that is not designated is updated by (for messages).
    _plain = "Adam"

    def __init__(self, learning_rate, l2, spherical, channel_axes, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.l2 = check_range("l2", l2, 0.0)
        self.spherical = validate_spherical(spherical)
        self.channel_axes = layouts.validate_channel_axes(channel_axes)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        if self.spherical is None:
            warnings.warn(
                f"{type(self).__name__}: no variable is designated spherical, "
                f"so every variable is updated as by plain {self._plain} with "
                "L2. "
                f"To use the spherical updates, {_HOW_TO_DESIGNATE}.",
                stacklevel=2,
            )
        mask = designated_mask(var_list, self.spherical)
        if callable(self.spherical) or (
            isinstance(self.spherical, tuple) and self.spherical
        ):
            # Stored as the paths chosen, so that the config can hold it.
            self.spherical = _paths_regex(
                [v for v, m in zip(var_list, mask) if m], var_list
            )
        resolved = layouts.resolve_channel_axes(
            var_list, self.channel_axes, owner=type(self).__name__, grouped=mask
        )
        plan_layouts = []
        for variable, designated, layout in zip(var_list, mask, resolved):
            # A zero-size variable has no group to move on a sphere: its
            # step is the plain (no-op) one.
            designated = designated and math.prod(variable.shape) > 0
            if designated and layout is None:
                # Rank <= 1 has no output-channel axis: one group.
                layout = layouts.ChannelLayout.create(tuple(variable.shape), ())
            plan_layouts.append(layout if designated else None)
        self._plan = _VariablePlan(
            layouts=tuple(plan_layouts),
            transports=tuple(
                layout is not None and layout.group_size > 1 for layout in plan_layouts
            ),
        )

    def _add_slots(self, var_list, first_moment=True, second_moment=False):
        """Per variable, in this order: the first moment (full size), then the
        second moment (one value per group if designated, else full size).
        Returns the two lists (None where a slot is not kept)."""
        firsts, seconds = [], []
        for index, variable in enumerate(var_list):
            layout = self._plan.layouts[index]
            if self._overwrite_variable_with_gradient(variable):
                firsts.append(None)
                seconds.append(None)
                continue
            firsts.append(
                self.add_variable_from_reference(variable, "momentum")
                if first_moment
                else None
            )
            if not second_moment:
                seconds.append(None)
            elif layout is None:
                seconds.append(self.add_variable_from_reference(variable, "velocity"))
            else:
                seconds.append(
                    self.add_variable(
                        shape=(layout.num_channels,),
                        dtype=variable.dtype,
                        name=layouts.variable_path(variable).replace("/", "_")
                        + "_group_velocity",
                    )
                )
        return firsts, seconds

    def _sums(self, index, variable, gradient, values):
        return None  # no decision to make

    def channel_layout(self, variable):
        """The `layouts.ChannelLayout` of a designated `variable`, else None."""
        return self._plan.layouts[self._get_variable_index(variable)]

    def designated(self, variable):
        """Whether `variable` is updated on the sphere."""
        return self.channel_layout(variable) is not None

    def _gradient(self, g, variable):
        """The (dense) gradient plus the coupled L2 term, `g + l2 * w`."""
        if self.l2:
            g = g + self.l2 * variable
        return g

    @staticmethod
    def _transport(layout, m, w, w_new, eps=0.0):
        """The first moment moved to the tangent space at `w_new` and rescaled
        by the radius ratio (the reference's transport, Eq. 19), all in the
        layout's view:

            m <- (m * <w, w_new>_c - <m, w_new>_c * w) / (<w_new, w_new>_c + eps)

        Returns `(m, <w_new, w_new>_c)`; `<m, w_new>_c` becomes 0 (up to eps).
        """
        n = layout.group_sum(w_new * w_new)
        w_wn = layout.per_element(layout.group_sum(w * w_new))
        m_wn = layout.per_element(layout.group_sum(m * w_new))
        m = (m * w_wn - m_wn * w) / layout.per_element(n + eps)
        return m, n

    def get_config(self):
        config = super().get_config()
        spherical = self.spherical
        if callable(spherical) or (isinstance(spherical, tuple) and spherical):
            warnings.warn(
                f"{type(self).__name__}.get_config() before build: a "
                "`spherical` callable or list of variables can't be "
                "serialized, and is saved as None (nothing designated). "
                "Build the optimizer first (it then stores the paths chosen), "
                "or pass `keras_adamp.normalized_kernels(model)` or a regex.",
                stacklevel=2,
            )
            spherical = None
        config.update(
            {
                "l2": self.l2,
                "spherical": [] if isinstance(spherical, tuple) else spherical,
                "channel_axes": layouts.channel_axes_config(self.channel_axes),
            }
        )
        return config


# -- which kernels a normalization layer makes scale-invariant ---------------

_BATCH_NORM = ("BatchNormalization",)
_WHOLE_NORMS = (
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
    "UnitNormalization",
)


def _norm_kind(norm, layer):
    """How `norm`, fed by `layer`, makes `layer`'s kernel scale-invariant:
    "channel" (a BatchNorm over the layer's output channels: each channel
    is), "whole" (LayerNorm, GroupNorm, RMSNorm, UnitNorm: the kernel as a
    whole is), or None."""
    for cls in type(norm).__mro__:
        if cls.__name__ in _BATCH_NORM:
            channels_first = getattr(layer, "data_format", None) == "channels_first"
            try:
                rank = len(norm.input.shape)
            except (AttributeError, ValueError):  # never called, or shared
                rank = None
            axis, last = norm.axis, -1
            if rank:
                axis, last = axis % rank, rank - 1
            return "channel" if axis == (1 if channels_first else last) else None
        if cls.__name__ in _WHOLE_NORMS:
            return "whole"
    return None


def _kernels(layer):
    """The layer's own variables named `kernel` (Dense, Conv*, EinsumDense,
    DepthwiseConv*), not those of its sublayers (an attention layer's)."""
    own = getattr(layer, "path", None)
    return [
        v
        for v in layer.trainable_weights
        if layouts.variable_path(v) == f"{own}/kernel"
    ]


def _has_bias(layer):
    own = getattr(layer, "path", None)
    return any(
        layouts.variable_path(v) == f"{own}/bias" for v in layer.trainable_weights
    )


def _walk(model, found):
    """Adds `(kernel, kind)` for the kernels of `model`'s layers whose every
    use feeds a normalization layer of that model directly; recurses into
    nested functional and Sequential models."""
    members = model.layers
    for layer in members:
        if _is_graph_model(layer):
            _walk(layer, found)
    if isinstance(model, keras.Sequential):
        consumers = {id(a): [b] for a, b in itertools.pairwise(members)}
    else:
        # Every operation of the graph, not only its layers: a kernel whose
        # output also feeds a `keras.ops` call is not only normalized.
        ids = {id(op) for op in getattr(model, "_operations", members)}
        outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
        consumers = {}
        for layer in members:
            uses = []
            for node in getattr(layer, "_outbound_nodes", []):
                if id(node.operation) in ids:
                    uses.append(node.operation)
            # An output of the model is not followed by anything here.
            if any(
                id(t) in outputs
                for node in getattr(layer, "_inbound_nodes", [])
                for t in keras.tree.flatten(node.output_tensors)
            ):
                uses.append(None)
            consumers[id(layer)] = uses
    for layer in members:
        uses = consumers.get(id(layer), [])
        kinds = {_norm_kind(u, layer) if u is not None else None for u in uses}
        if not uses or None in kinds or len(kinds) != 1:
            continue
        (kind,) = kinds
        # Mean subtraction over the batch removes a per-channel bias; a
        # LayerNorm or GroupNorm does not, so a biased kernel there is not
        # scale-invariant.
        if kind == "whole" and _has_bias(layer):
            continue
        for kernel in _kernels(layer):
            found.append((kernel, kind))


def _is_graph_model(layer):
    """Functional (a graph of layers) or Sequential (a chain)."""
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and hasattr(layer, "_operations")
    )


def _normalized(model):
    if not _is_graph_model(model):
        raise ValueError(
            f"normalized_kernels needs a functional or Sequential model, whose "
            f"graph says which layer feeds which; {type(model).__name__} is a "
            "subclassed model, whose `call` can't be read. Designate the "
            "kernels yourself: a regex on their paths, or a list of variables."
        )
    if not model.built:
        raise ValueError(
            "normalized_kernels needs a built model (give Sequential an "
            "`keras.Input`, or call `model.build(shape)`)."
        )
    found = []
    _walk(model, found)
    return found


def normalized_kernels(model):
    """The paper's spherical set for a Keras model, as a regex for `spherical`.

    A kernel (the `kernel` of Dense, Conv*, DepthwiseConv*, EinsumDense...) is
    designated when every use of its layer's output feeds, directly, a
    BatchNormalization over the output channels (then each channel is
    scale-invariant; its mean subtraction removes a bias), or a
    LayerNormalization, GroupNormalization, RMSNormalization or
    UnitNormalization (then the whole kernel is, provided the layer has no
    bias). Functional models are read from their graph, Sequential
    from their order; nested functional/Sequential models are read too. The
    kernels inside a custom layer are never designated; a subclassed model
    raises ValueError (its `call` can't be read: pass a regex or a list).

        optimizer = keras_adamp.AdamSRT(
            spherical=keras_adamp.normalized_kernels(model),
            channel_axes=keras_adamp.normalized_kernel_axes(model),
        )

    Returns:
        A regular expression matching exactly the designated variables' paths
        (escaped, anchored at the end of the path and at a `/` or its start,
        so that it still matches after a `.keras` round trip, which can drop
        a Sequential model's name from its variables' paths; it can be saved
        in the optimizer's config), or `[]` if there are none.
    """
    found = _normalized(model)
    if not found:
        return []
    return _paths_regex([k for k, _ in found], model.weights)


def normalized_kernel_axes(model):
    """`channel_axes` entries for the kernels that `normalized_kernels` finds
    before a LayerNorm, GroupNorm or RMSNorm: `{path regex: []}`, the whole
    kernel as one group (a BatchNorm's kernels keep the output-channel
    default). Put it first when merging with another override:
    `{**normalized_kernel_axes(model), **other}` (the first matching pattern
    wins)."""
    return {
        _paths_regex([k], model.weights): []
        for k, kind in _normalized(model)
        if kind == "whole"
    }
