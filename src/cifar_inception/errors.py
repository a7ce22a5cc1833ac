"""The one exception type the command line turns into a one-line message.

Every module raises :class:`CifarInceptionError` (or a subclass) for bad input that the user
can fix: a missing data folder, a corrupt archive, an unknown model name. The CLI prints
``error: <message>`` and exits with status 2; anything else is a bug and keeps its traceback.
"""


class CifarInceptionError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class DataError(CifarInceptionError):
    """The data set could not be found, downloaded, verified or decoded."""


class ModelError(CifarInceptionError):
    """Unknown model name, bad option, or an input of the wrong shape."""


class CheckpointError(CifarInceptionError):
    """A checkpoint that is missing, unsafe, corrupt, or for another model."""
