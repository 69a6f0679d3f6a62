"""Exceptions for mistakes a user can fix: bad options, files or paths.

The command line prints these as one line without a traceback; any other
exception is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
  """A config value, file or path that the user must correct."""


class ConfigError(UserInputError):
  """A config value that is missing, out of range or inconsistent."""


class DataNotFoundError(UserInputError):
  """A dataset that is neither in a local folder nor prepared by tfds."""


class CheckpointSaveError(UserInputError):
  """A checkpoint save that failed, such as on a full or read-only disk.

  Orbax's background threads of the failed save keep waiting for its
  signals until orbax's coordination timeout, so the command line exits
  without waiting for them.
  """
