"""Errors a user can cause. Each renders as one line naming where and what to do."""


class ConcordiaError(Exception):
    """Base of every error caused by user input (not a bug in Concordia)."""


class KernelSyntaxError(ConcordiaError):
    """A Python kernel uses something outside the supported subset."""


class IRParseError(ConcordiaError):
    """IR text that does not parse."""


class IRVerifyError(ConcordiaError):
    """A well-formed module that breaks a typing or structural rule."""


class LaunchError(ConcordiaError):
    """Wrong launch arguments: count, dtype, geometry, foreign buffers."""


class KernelRuntimeError(ConcordiaError):
    """A kernel did something the semantics forbid (e.g. an out-of-bounds access)."""


class BackendUnavailable(ConcordiaError):
    """A backend that cannot run here; the message says why and how to fix it."""


def where(loc) -> str:
    """'file:line: ' prefix for a location, or '' when there is none."""
    return f"{loc.file}:{loc.line}: " if loc is not None else ""
