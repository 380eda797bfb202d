import keras
from keras import ops

from keras_adamp._base import ProjectedOptimizer
from keras_adamp._base import check_range
from keras_adamp._base import one_minus_power
from keras_adamp._docs import base_optimizer_keyword_args


@keras.saving.register_keras_serializable(package="keras_adamp")
class AdamP(ProjectedOptimizer):
    """Optimizer that implements AdamP: Adam without the weight-norm growth.

    AdamP (Heo et al., 2021) is Adam with decoupled weight decay plus one step.
    For a weight whose gradient is nearly orthogonal to it,
    `|cos(g, w)| < delta / sqrt(dim)` (the mark of a scale-invariant weight: a
    convolution or dense kernel followed by BatchNorm or LayerNorm), the radial
    component of the Adam update is removed. Momentum then no longer inflates
    the weight norm, which would shrink the effective step size, and the weight
    decay on that weight is scaled by `wd_ratio`. The test is tried per output
    channel first, then on the whole tensor. Biases of any rank and variables of
    rank <= 1 (normalisation parameters) are updated as by AdamW.

    Trajectories equal those of the official PyTorch code (`adamp==0.3.0`) once
    its layouts are transposed to Keras's.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.001`.
        beta_1: A float value. The exponential decay rate for the 1st moment
            estimates. Defaults to `0.9`.
        beta_2: A float value. The exponential decay rate for the 2nd moment
            estimates. Defaults to `0.999`.
        epsilon: A small constant for numerical stability, used in the Adam
            denominator, the cosine's norms and the projection's `||w|| + eps`.
            Added after the bias correction, as in PyTorch and the reference:
            `denom = sqrt(v_t) / sqrt(1 - beta_2^t) + epsilon`. Keras's Adam
            adds it to `sqrt(v_t)` and folds the correction into the learning
            rate, so the two differ where epsilon is not small next to
            `sqrt(v_t)`: with Keras AdamW's golden run (`epsilon=2`) the first
            step gives 0.4950 here, 0.4998 with AdamW. Defaults to `1e-8`
            (Keras's Adam uses `1e-7`).
        weight_decay: A float, decoupled weight decay as in AdamW:
            `w <- w * (1 - learning_rate * weight_decay * r)` with `r = wd_ratio`
            for projected weights, else 1. Defaults to `0.0`.
        delta: A float, the cosine threshold of the scale-invariance test.
            Defaults to `0.1`.
        wd_ratio: A float in [0, 1], the weight-decay factor applied to
            projected weights. Defaults to `0.1`.
        nesterov: Boolean, whether to use Nesterov momentum in the update.
            Defaults to `False`.
        channel_axes: Optional dict `{pattern: axes}` overriding which axes of a
            variable index its output channels; `pattern` is a regular
            expression searched in `variable.path`, `axes` an int or a list of
            ints (not necessarily contiguous), `[]` for the whole tensor as one
            group. `keras_adamp.channel_axes_for(model)` derives it for every
            variable of a model from its layers (Conv*Transpose, depthwise
            multipliers, EinsumDense and attention kernels, which static rules
            can't tell apart). A pattern that matches no variable being
            trained (a frozen layer) is ignored with a warning. Defaults to
            `None` (the static rules of
            `keras_adamp.layouts.default_channel_axes`).
        {{base_optimizer_keyword_args}}

    References:
        - [Heo et al., 2021](https://arxiv.org/abs/2006.08217)
        - [Official PyTorch code](https://github.com/clovaai/AdamP)
    """

    # Its step in keras_adamp/_torch.py (`_torch.STEPS`).
    _torch_step = "adamp"

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        weight_decay=0.0,
        delta=0.1,
        wd_ratio=0.1,
        nesterov=False,
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
        self.beta_1 = check_range("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = check_range("beta_2", beta_2, 0.0, 1.0)
        self.nesterov = bool(nesterov)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def _step_values(self, learning_rate, dtype):
        lr, sqrt_bc2, step_size = self._adam_step_sizes(learning_rate, dtype)
        decay = lr * self.weight_decay if self.weight_decay else 0.0
        return sqrt_bc2, step_size, decay

    def _moments(self, index, g, sqrt_bc2):
        """The new first and second moments and the Adam update."""
        b1, b2 = self.beta_1, self.beta_2
        m_new = b1 * self._momentums[index] + (1.0 - b1) * g
        v_new = b2 * self._velocities[index] + (1.0 - b2) * ops.square(g)
        denom = ops.sqrt(v_new) / sqrt_bc2 + self.epsilon
        if self.nesterov:
            return m_new, v_new, (b1 * m_new + (1.0 - b1) * g) / denom
        return m_new, v_new, m_new / denom

    def _sums(self, index, variable, g, values):
        if self._plan.layouts[index] is None:
            return None
        _, _, u = self._moments(index, g, values[0])
        return self._channel_sums(index, variable, g, u)

    def _assign(self, index, variable, g, values, coef, ratio):
        sqrt_bc2, step_size, decay = values
        m_new, v_new, u = self._moments(index, g, sqrt_bc2)
        self.assign(self._momentums[index], m_new)
        self.assign(self._velocities[index], v_new)
        self._finish(index, variable, u, step_size, decay, coef, ratio)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "nesterov": self.nesterov,
            }
        )
        return config


# Kept importable under its former name.
_one_minus_power = one_minus_power


AdamP.__doc__ = AdamP.__doc__.replace(
    "{{base_optimizer_keyword_args}}", base_optimizer_keyword_args
)
