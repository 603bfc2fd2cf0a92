"""Exceptions raised for problems the user can fix.

The CLI turns every :class:`DefectscopeError` into a one-line message (no traceback), so the
message must name the file and say what is wrong with it.
"""


class DefectscopeError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class DataError(DefectscopeError):
    """An image, mask or dataset folder cannot be used."""


class WeightsError(DefectscopeError):
    """Pretrained backbone weights are missing, corrupt or do not fit the network."""


class ModelFileError(DefectscopeError):
    """A saved run folder is missing, truncated, tampered with or of an unknown kind."""


class OutputError(DefectscopeError):
    """A result cannot be written where it was asked for, or would replace the user's own files."""


class NotExportable(DefectscopeError):
    """A method (or one configuration of it) has no ONNX graph."""


class ExportedModelError(DefectscopeError):
    """An exported model file is damaged, foreign, stale or does not match its run."""
