"""Errors a user can cause. The CLI prints these as one line on stderr and exits non-zero (no traceback)."""


class UserError(ValueError):
    """Bad input from the user: a missing file, an unknown name, an invalid option or a store that does not match."""
