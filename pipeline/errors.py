"""The errors mitoseg raises: one base class, one child per kind of failure.

Every message says what failed, what was expected, what was found, and what to do.
"""

from __future__ import annotations


class MitosegError(Exception):
    """Base class of every error mitoseg raises on purpose."""


class ConfigError(MitosegError):
    """A job file or command-line option is invalid."""


class StorageError(MitosegError):
    """A volume cannot be opened, read or written."""


class GeometryError(MitosegError):
    """A region of interest, block plan or shape does not fit the volume."""


class BlockFailedError(MitosegError):
    """A block could not be computed after all its retries."""


class ModelLoadError(MitosegError):
    """A checkpoint cannot be loaded or does not describe a usable network."""


class LeaseHeldError(MitosegError):
    """Another run holds the lease on an output (one writer at a time)."""
