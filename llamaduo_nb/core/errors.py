"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (params, files, environment). Printed as one line, exit code 2."""

    exit_code = 2
