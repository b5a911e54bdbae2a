"""Errors the CLI turns into one clear line and a non-zero exit."""


class DogtlError(ValueError):
    """A problem with the user's input or files that they can fix; the message says how."""


class DataError(DogtlError):
    """The data folder is structurally wrong (missing columns, files, duplicate ids...)."""


class CacheError(DogtlError):
    """A feature cache is missing, incomplete, damaged or was made with other settings."""


class DiskSpaceError(DogtlError):
    """Not enough free space for a write whose size is known before it starts."""
