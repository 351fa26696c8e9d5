"""Every exception Concordia raises on purpose, for all layers, in one module (the ground floor,
so that each layer can raise them without importing upward). Each renders as one line
naming where and what to do."""


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


class CompileError(ConcordiaError):
    """The generated source did not compile, or a renderer lacks an op: a bug in a lowering,
    reported with the compiler's log or the op, its types and its location."""


class TileRefusal(ConcordiaError):
    """The Tenstorrent tile tier cannot express this kernel; the message names the op and its
    line (the kernel then runs on the scalar tier)."""


class LogError(ConcordiaError):
    """A delta log that cannot be used: foreign, newer, corrupt. Carries the byte offset."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: at byte {offset}: {reason}")
        self.path, self.offset, self.reason = path, offset, reason


class SnapshotError(ConcordiaError):
    """A snapshot that cannot be used (foreign, newer, corrupt, or not matching its kernel)."""


class TaskError(ConcordiaError):
    """A persistent-kernel task faulted or hung; `pending` holds every task not known to be
    complete."""

    def __init__(self, message: str, pending: list):
        super().__init__(message)
        self.pending = pending


def where(loc) -> str:
    """'file:line: ' prefix for a location, or '' when there is none."""
    return f"{loc.file}:{loc.line}: " if loc is not None else ""
