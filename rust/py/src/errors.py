# The exception hierarchy of kvsync._core, run once when the module is
# initialised (errors.rs) with __name__ = "kvsync._core", so every class
# pickles by reference to kvsync._core. Defined in Python because each class
# has two bases (kvsync.Error and the builtin callers already catch), which
# PyO3's create_exception! cannot express.
#
# Pickling: BaseException pickles as (type, args, __dict__), so attributes
# set in __init__ travel in __dict__; FileError pickles through OSError's
# (errno, strerror, filename) arguments.


class Error(Exception):
    """Base class of every error kvsync raises."""


class DecodeError(Error, ValueError):
    """A payload that is not a well-formed KVEventBatch.

    ``reason`` says what was wrong; ``event`` (index in the batch),
    ``field`` (event field), ``offset`` (byte offset in the payload) and
    ``payload`` (position in a multi-payload call) say where, when known.
    """

    def __init__(
        self, message, reason=None, event=None, field=None, offset=None, payload=None
    ):
        super().__init__(message)
        self.reason = message if reason is None else reason
        self.event = event
        self.field = field
        self.offset = offset
        self.payload = payload


class SnapshotError(Error, ValueError):
    """An index snapshot that cannot be read (the message names the file)."""


class UnknownWorkerError(Error, KeyError):
    """A worker id the index does not know."""

    # KeyError's str() is the repr of its argument; this is a message.
    __str__ = BaseException.__str__


class InvalidArgumentError(Error, ValueError):
    """An argument out of range, or a worker registered for another model."""


class FileError(Error, OSError):
    """A snapshot file that cannot be written or read.

    ``filename`` names it; ``errno`` is set when the system gave one.
    """

    def __str__(self):
        if self.filename is None or self.strerror is None:
            return super().__str__()
        return f"{self.filename}: {self.strerror}"


class WorkerBusyError(Error, RuntimeError):
    """The worker is followed by an event stream; change it through the stream."""


class AlreadyFollowedError(Error, ValueError):
    """The worker id is already followed by an event stream."""


class InvariantError(Error, AssertionError):
    """Index.check() found a broken internal invariant (a bug in kvsync)."""
