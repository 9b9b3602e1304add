"""One exception tree for everything layerwarm can get wrong.

    LayerwarmError
    ├── TransientError             worth retrying: timeouts, resets, 429, 5xx
    │   ├── RemoteTierUnavailable  the shared blob store did not answer
    │   └── BrokerUnavailable      Redis (distributed mode's broker) did not answer
    └── PermanentError             retrying cannot help; fail with the message
        ├── UsageError             bad command line or settings
        ├── InvalidReference       an image reference that does not parse
        ├── InvalidDigest          not `sha256:` + 64 hex (or `sha512:` + 128)
        ├── InvalidManifest        a manifest or config we cannot use
        ├── PlatformNotFound       an index without the platform asked for
        ├── UnsupportedMediaType   a layer type we cannot decompress
        ├── NotFound               the registry says 404
        ├── Unauthorized           401/403 after trying the credentials we have
        ├── InsecureRegistry       plain HTTP to a registry that is not allowed it
        ├── NoSpace                the cache's filesystem is full
        ├── NotAFile               a name in the cache that is a link, FIFO, directory...
        ├── ImagePathError         a path an image's merged view cannot serve (also OSError)
        │   ├── NotInImage             no such path (also FileNotFoundError)
        │   ├── NotADirectoryInImage   listdir of a non-directory (also NotADirectoryError)
        │   ├── NotASymlinkInImage     readlink of something not a symlink
        │   ├── NotAFileInImage        open of something not a regular file
        │   └── SymlinkLoopInImage     more than 40 symlinks while resolving a path
        └── VerificationError      bytes that are not what their digest says
            ├── DigestMismatch
            ├── SizeMismatch
            └── LimitExceeded      a layer that expands past the configured caps

Messages are one line and name what failed and where: they are shown to users as is.
"""

from __future__ import annotations

import errno


class LayerwarmError(Exception):
    """Base of every error layerwarm raises on purpose."""


class TransientError(LayerwarmError):
    """A failure that may pass: retry with backoff, honouring `retry_after` when set."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RemoteTierUnavailable(TransientError):
    """The remote blob store could not be reached or answered with a server error."""


class BrokerUnavailable(TransientError):
    """Redis, the broker and job store of distributed mode, refused us or did not answer."""


class PermanentError(LayerwarmError):
    """A failure that retrying cannot fix."""


class UsageError(PermanentError):
    """Bad arguments or settings."""


class InvalidReference(PermanentError):
    """An image reference that does not parse."""


class InvalidDigest(PermanentError):
    """A digest string that is not a well-formed, supported digest."""


class InvalidManifest(PermanentError):
    """A manifest, index or image config that is malformed or unusable."""


class PlatformNotFound(PermanentError):
    """An image index has no manifest for the requested platform."""


class UnsupportedMediaType(PermanentError):
    """A manifest or layer media type layerwarm does not handle."""


class NotFound(PermanentError):
    """The registry has no such repository, manifest or blob (or the cache no such layer)."""


class Unauthorized(PermanentError):
    """The registry refused our credentials (or our lack of them)."""


class InsecureRegistry(PermanentError):
    """Plain HTTP was asked for a registry not allowed to use it."""


class VerificationError(PermanentError):
    """Bytes that do not match what was promised; nothing is cached from them."""


class DigestMismatch(VerificationError):
    """The content hashes to another digest than expected."""


class SizeMismatch(VerificationError):
    """The content has another length than its descriptor says."""


class LimitExceeded(VerificationError):
    """A layer that decompresses past the size or ratio cap (a decompression bomb)."""


class NoSpace(PermanentError):
    """ENOSPC while writing into the cache; the partial file is removed."""


class NotAFile(PermanentError):
    """A name in the cache that is not a regular file (a planted link, a FIFO, a device).

    Never followed, opened or read: see pipeline/nofollow.py.
    """


class ImagePathError(PermanentError, OSError):
    """A path in an image's merged view (pipeline/imageview.py) that cannot serve the call.

    Also an OSError carrying the errno a filesystem would give, so a FUSE layer can map it;
    str() is the one-line message, naming the path.
    """

    errno_code = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = self.errno_code


class NotInImage(ImagePathError, FileNotFoundError):
    """No such path in the image (after whiteouts)."""

    errno_code = errno.ENOENT


class NotADirectoryInImage(ImagePathError, NotADirectoryError):
    """A directory was needed (listdir, or a path going through it) but this is not one."""

    errno_code = errno.ENOTDIR


class NotASymlinkInImage(ImagePathError):
    """readlink of a path that is not a symbolic link."""

    errno_code = errno.EINVAL


class NotAFileInImage(ImagePathError):
    """open of a path that is not a regular file (a directory, a device, a FIFO...)."""

    errno_code = errno.EISDIR


class SymlinkLoopInImage(ImagePathError):
    """More than 40 symbolic links met while resolving one path (a loop, most likely)."""

    errno_code = errno.ELOOP


def layer_reason(digest: object, reason: str) -> str:
    """`reason` without a leading `layer DIGEST: `. Most stage errors start with it (they
    are raised with their layer's name); a line that names the layer first says it once."""
    return reason.removeprefix(f"layer {digest}: ")


def describe_error(e: BaseException) -> str:
    """One line for a user: our errors speak for themselves; OS errors name the file."""
    if isinstance(e, LayerwarmError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f" on {e.filename}" if e.filename else ""
        return f"{e.strerror.lower()}{where}"
    return f"unexpected {type(e).__name__}: {e}"
