"""Docstring text shared by the optimizers (Keras keeps its own copy in a
private module)."""

base_optimizer_keyword_args = """clipnorm: Float. If set, the gradient of each weight is individually
            clipped so that its norm is no higher than this value.
        clipvalue: Float. If set, the gradient of each weight is clipped to be
            no higher than this value.
        global_clipnorm: Float. If set, the gradient of all weights is clipped
            so that their global norm is no higher than this value.
        use_ema: Boolean, defaults to `False`. If `True`, exponential moving
            average (EMA) is applied: a moving average of the weights is kept
            and, with `ema_overwrite_frequency`, periodically written back.
        ema_momentum: Float, defaults to 0.99. Only used if `use_ema=True`.
            The momentum of the EMA of the weights.
        ema_overwrite_frequency: Int or None, defaults to None. Only used if
            `use_ema=True`. Every `ema_overwrite_frequency` steps the model
            variables are overwritten by their moving average; if None, only
            `finalize_variable_values()` (called at the end of `fit`) does so.
        loss_scale_factor: Float or `None`. If a float, the loss is multiplied
            by it before the gradients are computed, and the gradients are
            divided by it before the update.
        gradient_accumulation_steps: Int or `None`. If an int, the model and
            optimizer variables are updated every `gradient_accumulation_steps`
            steps with the average of the gradients since the last update.
        name: String or `None`. The name of the optimizer, used for its
            variables and in logged metric names (`learning_rate_{name}`).
            Defaults to `None`: the lower-case class name, made unique in the
            process (`adamp`, `adamp_1`, ...) as Keras names its own."""
