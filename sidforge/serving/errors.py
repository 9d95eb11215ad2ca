"""Errors the server turns into HTTP answers: a 4xx naming the field, or a 503/504 for the server's state.

They are raised in whichever process finds the problem (the ingress or a model replica; Ray re-raises a
replica's exception in the caller as an instance of the same class) and mapped to responses in one
place, :mod:`sidforge.serving.api`.
"""

from __future__ import annotations


class BadInput(ValueError):
    """A request the server cannot serve because of its content.

    Args:
        field: the offending field, as a path into the request body (``history[3]``,
            ``items[0].features.text``).
        message: what is wrong and how to fix it.
        status: the HTTP status (422 unless the request is too large: 413).
    """

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(field, message, status)  # args rebuild the exception after pickling
        self.field, self.message, self.status = field, message, status

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class Unavailable(RuntimeError):
    """A deployment the request needs did not answer (replica lost, overloaded): HTTP 503."""
