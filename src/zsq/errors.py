class ZsqError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it.

    The CLI prints it and exits with status 2.
    """
