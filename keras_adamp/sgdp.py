import keras
from keras import ops

from keras_adamp._base import ProjectedOptimizer
from keras_adamp._base import check_range
from keras_adamp._docs import base_optimizer_keyword_args


@keras.saving.register_keras_serializable(package="keras_adamp")
class SGDP(ProjectedOptimizer):
    """Optimizer that implements SGDP: SGD-momentum without the weight-norm
    growth.

    SGDP (Heo et al., 2021) is SGD with momentum plus one step. For a weight
    whose gradient is nearly orthogonal to it, `|cos(g, w)| < delta / sqrt(dim)`
    (a scale-invariant weight: a kernel followed by BatchNorm or LayerNorm), the
    radial component of the momentum update is removed, so the weight norm no
    longer grows and the effective step size no longer shrinks; the weight
    decay on that weight is scaled by `wd_ratio`. Biases of any rank and
    variables of rank <= 1 are updated as by SGD with decoupled weight decay.

    The update, as in the official PyTorch code (`adamp==0.3.0`):

        buf = momentum * buf + (1 - dampening) * g
        u = g + momentum * buf  if nesterov  else  buf
        u, r = projection(w, g, u)
        w = w * (1 - lr * weight_decay * r / (1 - momentum)) - lr * u

    Without Nesterov the stored momentum buffer is the projected `u`, as in the
    reference (which projects the buffer in place).

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.01`.
        momentum: A float in [0, 1), the momentum factor. Defaults to `0.0`.
        dampening: A float in [0, 1), dampening for momentum. Defaults to `0.0`.
        nesterov: Boolean, whether to use Nesterov momentum (needs
            `momentum > 0` and `dampening == 0`). Defaults to `False`.
        epsilon: A small constant for numerical stability, used in the cosine's
            norms and the projection's `||w|| + eps`. Defaults to `1e-8`.
        weight_decay: A float, decoupled weight decay, divided by
            `1 - momentum` as in the reference. Defaults to `0.0`.
        delta: A float, the cosine threshold of the scale-invariance test.
            Defaults to `0.1`.
        wd_ratio: A float in [0, 1], the weight-decay factor applied to
            projected weights. Defaults to `0.1`.
        channel_axes: Optional dict `{pattern: axes}` overriding which axes of a
            variable index its output channels; see `keras_adamp.AdamP`.
            Defaults to `None`.
        {{base_optimizer_keyword_args}}

    References:
        - [Heo et al., 2021](https://arxiv.org/abs/2006.08217)
        - [Official PyTorch code](https://github.com/clovaai/AdamP)
    """

    # Its step in keras_adamp/_torch.py (`_torch.STEPS`).
    _torch_step = "sgdp"

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        epsilon=1e-8,
        weight_decay=0.0,
        delta=0.1,
        wd_ratio=0.1,
        channel_axes=None,
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
            epsilon=epsilon,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            channel_axes=channel_axes,
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
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(
                "`nesterov=True` requires `momentum` > 0 and `dampening` == 0. "
                f"Received: momentum={momentum}, dampening={dampening}"
            )

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Like Keras's SGD: no momentum slot without momentum (1 - dampening)
        # times the gradient is the whole update then.
        self._momentums = (
            self.add_optimizer_variables(var_list, "momentum")
            if self.momentum != 0
            else []
        )

    def _step_values(self, learning_rate, dtype):
        lr = ops.cast(learning_rate, dtype)
        # Dampening does not enter the decay (as in the reference).
        scale = 1.0 / (1.0 - self.momentum)
        decay = lr * (self.weight_decay * scale) if self.weight_decay else 0.0
        return lr, decay

    def _direction(self, index, g):
        """The update before the projection, and the new momentum buffer
        (None without momentum)."""
        g_in = (1.0 - self.dampening) * g if self.dampening else g
        if self.momentum == 0:
            return g_in, None
        buf_new = self.momentum * self._momentums[index] + g_in
        if self.nesterov:
            return g + self.momentum * buf_new, buf_new
        return buf_new, buf_new

    def _sums(self, index, variable, g, values):
        if self._plan.layouts[index] is None:
            return None
        u, _ = self._direction(index, g)
        return self._channel_sums(index, variable, g, u)

    def _assign(self, index, variable, g, values, coef, ratio):
        lr, decay = values
        u, buf_new = self._direction(index, g)
        store = None
        if self.momentum and self.nesterov:
            self.assign(self._momentums[index], buf_new)
        elif self.momentum:
            # The reference projects the buffer in place: the stored
            # momentum is the projected u (computed again here from the
            # buffer before the step).
            store = self._momentums[index]
        self._finish(index, variable, u, lr, decay, coef, ratio, store)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "dampening": self.dampening,
                "nesterov": self.nesterov,
            }
        )
        return config


SGDP.__doc__ = SGDP.__doc__.replace(
    "{{base_optimizer_keyword_args}}", base_optimizer_keyword_args
)
