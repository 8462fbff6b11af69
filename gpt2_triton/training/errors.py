"""How a run ends early: each is reported in one line, no traceback (`exit_on_errors`)."""


class RunError(Exception):
    """Ends the run with one line that names the problem and what to do: a bad step's data, a full disk, a
    process that stopped answering. `reported`: that line has been printed already."""

    reported = False


class ConfigError(RunError, ValueError):
    """A problem with the configuration, the data or the run folder, found before anything was written."""


class NonFiniteError(RunError, RuntimeError):
    """The loss, the gradient norm or the weights became NaN/inf."""
