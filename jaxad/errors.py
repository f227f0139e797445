"""Errors raised at the edge (config and data validation), before anything compiles.

Every message names the problem and the fix, so users never see a traceback from deep
inside XLA or tf.data for a mistake in their input.
"""


class ConfigError(ValueError):
  """A config value is missing, mistyped or inconsistent; the message names the key."""


class DataError(ValueError):
  """The data cannot be read as configured; the message names the file or dataset."""


class CheckpointError(ValueError):
  """A workdir's checkpoint is missing or does not match the config."""
