class ZsqError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it. The CLI exits 2 on it."""
