"""The error a run raises when it cannot go on; the CLI prints its message, no traceback."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""
