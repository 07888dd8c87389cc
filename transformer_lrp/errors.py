"""Exceptions with messages that name the problem."""


class UnsupportedModelError(TypeError):
    """The model (or one of its modules or settings) is not one the adapters can describe exactly."""


class InputError(ValueError):
    """The inputs or the target do not fit the model (shape, dtype, range, non-finite values)."""
