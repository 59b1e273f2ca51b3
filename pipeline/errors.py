"""Errors a user can act on. The CLI prints them as one line; anything else is a bug and keeps its traceback."""


class SparamxError(Exception):
    """Base of the errors that name the file, key, tensor or model at fault."""


class RecipeError(SparamxError, ValueError):
    """A recipe key that is unknown, mistyped or out of range."""


class ModelError(SparamxError):
    """A model that cannot be found, reached or handled."""


class ArtifactError(SparamxError):
    """An artifact directory that is missing, corrupt or of an unknown version."""


class DataError(SparamxError):
    """Calibration or evaluation text that cannot be found or is too short."""
