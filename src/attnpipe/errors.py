"""The one base class of expected failures.

An `AttnpipeError` is a problem with the user's input or environment (a recipe key, a missing
stage output, an unreadable file, an unreachable cluster), never a bug: its message says what is
wrong and how to fix it, and the command line prints it as one line (`attnpipe: error: ...`)
instead of a traceback. Each stage's error class derives from it (and from the built-in class
that describes it, so `except ValueError` keeps working).

`attnpipe.models` imports nothing of the package, so its errors (`attnpipe.models.ModelError`)
are listed beside this class where the command line decides what is expected.
"""

from __future__ import annotations


class AttnpipeError(Exception):
    """An expected failure whose message tells the user what to do."""
