"""The error type for mistakes in a user's config, data or command line.

The command-line programs print a :class:`UserError` as one line (``error: ...``) and exit with
status 2 instead of showing a traceback; everywhere else it is an ordinary ``ValueError``, so code
that catches ``ValueError`` keeps working. Its message names the field or file and the fix.
"""


class UserError(ValueError):
  """A bad config field, registry name, config file, data file or command-line argument."""
