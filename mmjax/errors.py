"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
  """Bad input from the user: a flag, a config key, a file, a record. The message names it."""

