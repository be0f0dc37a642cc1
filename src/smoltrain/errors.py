"""The errors a user can act on. The CLI prints their message (what went wrong, and the fix)
as one line, no traceback; `--debug` adds it. Each says what kind of thing failed."""


class UserError(RuntimeError):
    """Something the user can fix; the message says what and how."""


class TrainingError(UserError):
    """A run that cannot go on: its config, its schedule, non-finite steps, spikes."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found, read, or resumed by this model."""


class DataError(UserError):
    """A data source or prepared shards that cannot be read as they are."""


class WriteError(UserError):
    """A file or folder that could not be written (full disk, read-only, no permission)."""


class FolderInUse(UserError):
    """A folder another process holds the lock of."""


class MissingExtra(UserError):
    """An optional dependency that is not installed; the message names the pip command."""
