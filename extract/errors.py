"""The user's faults, as opposed to bugs: the command line prints these as one line and exits 2.

Every error offshelf raises about a value, file or layout the user gave derives from
``UserError`` and names the value and the fix. Anything else (a ``ValueError`` from inside
NumPy, Keras or scikit-learn, say) is a bug, and keeps its traceback.
"""


class UserError(ValueError):
    """A bad value, file or layout given by the user; the message names it and the fix."""
