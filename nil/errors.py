"""Errors a user can cause. The CLI turns them into one clear sentence and exit code 1."""


class NilError(Exception):
    """Bad input from the user: a missing path, an unreadable file, a wrong shape, a bad option."""
