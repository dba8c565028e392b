"""The one exception type for bad input: the CLI prints its message alone (no traceback) and exits 2."""


class SaeError(Exception):
    """Bad input or state the user can fix: a wrong site, a store from another run, an empty corpus..."""
