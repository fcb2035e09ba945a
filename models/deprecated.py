"""Old keyword names kept for one release: a call that uses one still works and warns with the new name."""

from __future__ import annotations

import functools
import warnings


def renamed_keywords(**renames: str):
    """Decorator: `old=new` pairs; a call passing `old=` is passed on as `new=` (DeprecationWarning). Given both,
    the old one wins: that is what `dataclasses.replace(obj, old=...)` means, which passes every field by its
    new name too."""
    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    warnings.warn(f"{function.__qualname__}: the keyword {old!r} is now {new!r}", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return call

    return wrap
