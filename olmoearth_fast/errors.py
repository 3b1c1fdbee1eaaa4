"""Errors a user makes in setting up a run, as opposed to bugs.

A `UserError`'s message is one line that names the problem and the fix ("data.dataset=/x: no
such directory; point it at ..."). The launchers (`olmoearth_fast.train`, `olmoearth_fast.eval`)
print it without a traceback and exit with status 2; any other exception is a bug and keeps its
traceback. Each concrete class also derives from the builtin error a library caller would
catch for the same problem (an unknown name is a KeyError, ...), so code that called these
functions before keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A run set up wrong: the message says what and how to fix it, in one line."""

    def __str__(self) -> str:
        # plain text even where KeyError would quote it
        return " ".join(str(a) for a in self.args)


class UserKeyError(UserError, KeyError):
    """An unknown name: experiment, config key, model size, checkpoint key."""


class UserValueError(UserError, ValueError):
    """A bad or inconsistent value: a setting, a dataset, a checkpoint."""


class UserTypeError(UserError, TypeError):
    """A config value of the wrong type."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A path that does not exist or holds nothing usable."""


class UserFileExistsError(UserError, FileExistsError):
    pass
