import math

import keras
from keras import ops

from keras_adamp._base import check_range
from keras_adamp._docs import base_optimizer_keyword_args
from keras_adamp._spherical import SphericalOptimizer


@keras.saving.register_keras_serializable(package="keras_adamp")
class AdamS(SphericalOptimizer):
    """Optimizer that implements AdamS: Adam with one second moment per
    sphere ("Adam w/o (a)" of the seed paper).

    A kernel followed by BatchNorm is scale-invariant per output channel: only
    the direction of each channel's weights matters, and the weights move on
    a sphere. Adam's element-wise second moment deforms a step on that sphere
    differently along each coordinate (the paper's phenomenon (a)). AdamS
    keeps one second moment per group instead, the mean square gradient of
    the group (its sum, with the step scaled by `sqrt(d)`), so the step is an
    isotropic, rescaled gradient step on each sphere:

        g = grad + l2 * w
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * <g, g>_c          (one value per group c)
        w = w - lr * sqrt(d) * (m / (1 - beta_1^t)) / (sqrt(v / (1 - beta_2^t)) + eps)

    where `<a, b>_c` sums `a * b` over the group and `d` is its size. Only
    the *designated* variables (`spherical`) are treated so; every other
    variable is updated as by Adam with the coupled L2 term, element-wise,
    as in the authors' code (where the designated parameters are a separate
    group). It takes less memory than Adam: the second moment of a designated
    variable is one value per group.

    Use it where Adam is used, on a network with normalization layers; its
    accuracy was above Adam's in the paper's CIFAR and SVHN runs
    (ResNet-20 CIFAR-10 91.15 vs 90.98). `AdamSRT` adds the moments'
    transport. Trajectories equal the authors' PyTorch code's.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or
            a callable that takes no arguments and returns the actual value to
            use. The learning rate. Defaults to `0.001`.
        beta_1: A float value. The exponential decay rate for the 1st moment
            estimates. Defaults to `0.9`.
        beta_2: A float value. The exponential decay rate for the 2nd moment
            estimates. Defaults to `0.999`.
        epsilon: A small constant for numerical stability (the Adam
            denominator and the transport's `<w_new, w_new>_c + eps`).
            Defaults to `1e-8` (Keras's Adam uses `1e-7`).
        l2: A float, the reference's `weight_decay`: a coupled L2 penalty,
            `g = grad + l2 * w`, on every variable. Defaults to `0.0`.
        spherical: Which variables are updated on the sphere: a regular
            expression searched in `variable.path`, a list of variables, or a
            callable `variable -> bool` (stored as the regex of the paths it
            chose, once built); `[]` designates none.
            `keras_adamp.normalized_kernels(model)` gives the paper's set, the
            kernels followed by a normalization layer. Defaults to `None`:
            none, with a warning at build saying how to designate.
        channel_axes: Optional dict `{pattern: axes}` overriding which axes of a
            designated variable index its groups (output channels), as in
            `keras_adamp.AdamP`; `[]` makes the whole tensor one group (a
            kernel followed by LayerNorm). Defaults to `None` (the rules of
            `keras_adamp.layouts.default_channel_axes`; a designated variable
            of rank <= 1 is one group).
        weight_decay: Float or `None`. Keras's decoupled weight decay
            `w <- w * (1 - learning_rate * weight_decay)`, as in every Keras
            optimizer (independent of `l2`). Defaults to `None`.
        {{base_optimizer_keyword_args}}

    References:
        - [Roburin et al., 2020](https://arxiv.org/abs/2006.13382)
        - [Authors' PyTorch code](https://github.com/ymontmarin/adamsrt)
    """

    # AdamSRT: rescale and transport the moments to the new point.
    _rescale_and_transport = False
    # Its step in keras_adamp/_torch.py (`_torch.STEPS`), AdamSRT's too.
    _torch_step = "adams"

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
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
        self.beta_1 = check_range("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = check_range("beta_2", beta_2, 0.0, 1.0)
        self.epsilon = check_range("epsilon", epsilon, 0.0)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self._add_slots(
            var_list, second_moment=True
        )

    def _step_values(self, learning_rate, dtype):
        _, sqrt_bc2, step_size = self._adam_step_sizes(learning_rate, dtype)
        return sqrt_bc2, step_size

    def _assign(self, index, variable, g, values, coef, ratio):
        sqrt_bc2, step_size = values
        g = self._gradient(g, variable)
        b1, b2, eps = self.beta_1, self.beta_2, self.epsilon
        m = self._momentums[index]
        v = self._velocities[index]
        layout = self._plan.layouts[index]

        if layout is None:  # not designated: Adam with L2
            m_new = b1 * m + (1.0 - b1) * g
            v_new = b2 * v + (1.0 - b2) * ops.square(g)
            self.assign(m, m_new)
            self.assign(v, v_new)
            denom = ops.sqrt(v_new) / sqrt_bc2 + eps
            self.assign(variable, variable - step_size * m_new / denom)
            return

        w = layout.to_view(variable)
        g = layout.to_view(g)
        m_new = b1 * layout.to_view(m) + (1.0 - b1) * g
        v_new = b2 * v + (1.0 - b2) * layout.group_sum(ops.square(g))
        denom = ops.sqrt(v_new) / sqrt_bc2 + eps
        # v sums the group's squares: sqrt(d) turns it back into a mean.
        step_size = step_size * math.sqrt(layout.group_size)
        w_new = w - step_size * m_new / layout.per_element(denom)
        if self._rescale_and_transport and self._plan.transports[index]:
            m_new, n = self._transport(layout, m_new, w, w_new, eps)
            v_new = v_new * layout.group_sum(ops.square(w)) / (n + eps)
        self.assign(m, ops.reshape(m_new, layout.shape))
        self.assign(v, v_new)
        self.assign(variable, ops.reshape(w_new, layout.shape))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            }
        )
        return config


AdamS.__doc__ = AdamS.__doc__.replace(
    "{{base_optimizer_keyword_args}}", base_optimizer_keyword_args
)
