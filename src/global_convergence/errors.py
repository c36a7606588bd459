"""Errors that describe a problem in what the user gave (data, options, models).

The CLI turns every :class:`UserInputError` into one line on stderr and exit status 2. It
subclasses :class:`ValueError` so Python callers can catch it the usual way.
"""


class UserInputError(ValueError):
    """A value the user supplied is invalid; the message names the value and what was expected."""


class NumericalError(RuntimeError):
    """A computation met non-finite values: training's loss or parameters (the message names
    step and phase), or a matrix whose rank was asked for (the message names the condition)."""
