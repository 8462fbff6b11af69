"""How a run ends early: a problem the user can fix (one line, no traceback) or a non-finite value."""


class ConfigError(ValueError):
    """A problem with the configuration, the data or the run folder: reported in one line, no traceback."""


class NonFiniteError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN/inf."""
