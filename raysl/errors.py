"""The one error type the CLI turns into a single clear line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a path, key, row or value, and what to do about it."""


class RunFailed(Exception):
    """A run that Ray Train gave up on (retries spent): the CLI prints its one-line summary
    and exits with code 1."""
