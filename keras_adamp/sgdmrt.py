import keras
from keras import ops

from keras_adamp._base import check_range
from keras_adamp._docs import base_optimizer_keyword_args
from keras_adamp._spherical import SphericalOptimizer


@keras.saving.register_keras_serializable(package="keras_adamp")
class SGDMRT(SphericalOptimizer):
    """Optimizer that implements SGDMRT: SGD-momentum whose momentum follows
    the weight on its sphere (the seed paper's transport applied to SGD).

    For a scale-invariant group (the output channel of a kernel followed by
    BatchNorm, or a whole kernel followed by LayerNorm), the momentum buffer
    holds gradients taken at earlier points of the sphere and radii. After
    each step SGDMRT moves it to the tangent space at the new point and
    rescales it by the radius ratio:

        g = grad + l2 * w
        buf = momentum * buf + (1 - dampening) * g
        w_new = w - lr * buf
        buf = (buf * <w, w_new>_c - <buf, w_new>_c * w) / <w_new, w_new>_c

    where `<a, b>_c` sums `a * b` over the group `c`. Groups of one element
    and variables that are not designated (`spherical`) are updated as by SGD
    with momentum and the coupled L2, as in the authors' code.

    Use it where SGD with momentum is used on a network with normalization
    layers, to keep the momentum tangent to the sphere. Trajectories equal
    the authors' PyTorch code's.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.01` (as Keras's SGD and
            SGDP; the reference requires it).
        momentum: A float in [0, 1), the momentum factor. Defaults to `0.0`
            (then there is no buffer to transport: plain SGD).
        dampening: A float in [0, 1), dampening for momentum. Defaults to `0.0`.
        l2: A float, the reference's `weight_decay`: a coupled L2 penalty,
            `g = grad + l2 * w`. Defaults to `0.0`.
        spherical: Which variables are updated on the sphere; see
            `keras_adamp.AdamS`. Defaults to `None` (none, with a warning).
        channel_axes: Optional dict `{pattern: axes}` of group axes; see
            `keras_adamp.AdamS`. Defaults to `None`.
        weight_decay: Float or `None`. Keras's decoupled weight decay, as in
            every Keras optimizer. Defaults to `None`.
        {{base_optimizer_keyword_args}}

    References:
        - [Roburin et al., 2020](https://arxiv.org/abs/2006.13382)
        - [Authors' PyTorch code](https://github.com/ymontmarin/adamsrt)
    """

    _plain = "SGD"

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        dampening=0.0,
        l2=0.0,
        spherical=None,
        channel_axes=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            l2=l2,
            spherical=spherical,
            channel_axes=channel_axes,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self.momentum = check_range("momentum", momentum, 0.0, 1.0)
        self.dampening = check_range("dampening", dampening, 0.0, 1.0)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Like Keras's SGD: no buffer without momentum.
        self._momentums, _ = self._add_slots(var_list, first_moment=self.momentum != 0)

    def _step_values(self, learning_rate, dtype):
        return (ops.cast(learning_rate, dtype),)

    def _assign(self, index, variable, g, values, coef, ratio):
        (lr,) = values
        g = self._gradient(g, variable)
        if self.momentum == 0:
            self.assign(variable, variable - lr * ((1.0 - self.dampening) * g))
            return
        buf = self._momentums[index]
        buf_new = self.momentum * buf + (1.0 - self.dampening) * g
        w_new = variable - lr * buf_new
        if self._plan.transports[index]:
            layout = self._plan.layouts[index]
            buf_new, _ = self._transport(
                layout,
                layout.to_view(buf_new),
                layout.to_view(variable),
                layout.to_view(w_new),
            )
            buf_new = ops.reshape(buf_new, layout.shape)
        self.assign(buf, buf_new)
        self.assign(variable, w_new)

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "dampening": self.dampening})
        return config


SGDMRT.__doc__ = SGDMRT.__doc__.replace(
    "{{base_optimizer_keyword_args}}", base_optimizer_keyword_args
)
