"""User-facing errors: every message names the file, row and field at fault."""


class DaralignError(Exception):
    """Base class of errors that are shown to the user without a traceback."""


class ConfigError(DaralignError):
    """A config field is unknown, missing or has an impossible value."""


class DataError(DaralignError):
    """A dataset row is malformed (the message names file, row and field)."""


class AnnotationError(DaralignError):
    """An annotator returned something that cannot be trained on (NaN, wrong count, ...)."""
