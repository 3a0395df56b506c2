"""Exceptions raised for problems the user can fix (bad files, bad settings)."""


class IMTalkerError(Exception):
    """Base class of the project's own errors."""


class InputError(IMTalkerError, ValueError):
    """A user-supplied input (file, tensor, setting) is unusable; the message says what to do."""


class CheckpointError(IMTalkerError, ValueError):
    """A model file is unreadable or does not hold the expected IMTalker model."""
