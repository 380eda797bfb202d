import keras

from keras_adamp._docs import base_optimizer_keyword_args
from keras_adamp.adams import AdamS


@keras.saving.register_keras_serializable(package="keras_adamp")
class AdamSRT(AdamS):
    """Optimizer that implements AdamSRT: AdamS whose moments follow the
    weight on its sphere ("Adam w/o (abc)", the seed paper's final scheme,
    Eqs. 18-20).

    On a scale-invariant group (the output channel of a kernel followed by
    BatchNorm, or a whole kernel followed by LayerNorm) Adam's first moment
    mixes gradients taken at different points of the sphere and different
    radii (the paper's phenomena (b) and (c)). After each AdamS step, AdamSRT
    moves the first moment to the tangent space at the new point and rescales
    both moments by the radius ratio:

        (the AdamS step, w -> w_new)
        n = <w_new, w_new>_c
        v = v * <w, w>_c / (n + eps)
        m = (m * <w, w_new>_c - <m, w_new>_c * w) / (n + eps)

    so `<m, w_new>_c = 0`: the momentum never pushes the weight off its
    sphere. Groups of one element are not transported, and variables that are
    not designated are updated as by Adam with the coupled L2, as in the
    authors' code. It keeps about one full-size slot per designated kernel
    (Adam keeps two).

    Use it in place of Adam on a network with normalization layers: in the
    paper it is more accurate than Adam and AdamS in every setting
    (ResNet-20 CIFAR-10 91.81 vs 90.98 and 91.15; ResNet-18 CIFAR-100
    75.28 vs 71.30 and 74.44).
    Trajectories equal the authors' PyTorch code's.

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
            Defaults to `1e-8`.
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

    _rescale_and_transport = True


AdamSRT.__doc__ = AdamSRT.__doc__.replace(
    "{{base_optimizer_keyword_args}}", base_optimizer_keyword_args
)
