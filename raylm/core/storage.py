"""Paths that may be object storage: a local path, or an `s3://`, `gs://`, `file://` URI.

Everything goes through pyarrow's filesystems, as Ray Data and Ray Train do, so credentials and
endpoints come from where those take them: the standard environment of each process
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server,
`GOOGLE_APPLICATION_CREDENTIALS`), or the node's instance role. On a cluster, every node needs
them, not only the machine you type on.

Small directories that libraries want on a local disk (a tokenizer, a model dir) are copied once
into a local cache, `~/.cache/raylm/remote/` (`RAYLM_CACHE_DIR` overrides the root), keyed by the
URI, and read from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from raylm.core.errors import UserError


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def filesystem(path: str | Path):
    """(pyarrow filesystem, path within it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError with the scheme or bucket in its text
        raise UserError(f"cannot open {str(path)!r}: {err}") from None


@contextmanager
def storage_errors(path: str | Path):
    """An OSError from a filesystem (no such bucket, access denied, no route to the endpoint) as one
    UserError line that names the path and where credentials and endpoints come from."""
    try:
        yield
    except OSError as err:
        where = ("; check the URI, this machine's credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                 "GOOGLE_APPLICATION_CREDENTIALS or an instance role) and endpoint (AWS_ENDPOINT_URL)") if is_uri(path) else ""
        raise UserError(f"cannot read {str(path)!r}: {err}{where}") from None


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...`: a URI stays a URI, a local path an absolute local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).expanduser().resolve().joinpath(*parts))


def file_type(path: str | Path):
    fs, inner = filesystem(path)
    with storage_errors(path):
        return fs.get_file_info(inner).type


def is_file(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return file_type(path) == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return file_type(path) == pafs.FileType.Directory


def read_bytes(path: str | Path) -> bytes:
    fs, inner = filesystem(path)
    with storage_errors(path), fs.open_input_stream(inner) as stream:
        return stream.read()


def sha256_of(path: str | Path) -> str:
    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    with storage_errors(path), fs.open_input_stream(inner) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def files_under(path: str | Path) -> dict[str, int]:
    """{path relative to `path`: size} of every file below a directory (one listing, not a request per file)."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    with storage_errors(path):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return {info.path[len(inner.rstrip("/")) + 1 :]: info.size for info in infos if info.type == pafs.FileType.File}


def cache_root() -> Path:
    return Path(os.environ.get("RAYLM_CACHE_DIR", Path.home() / ".cache" / "raylm")) / "remote"


def local_dir(path: str | Path) -> str:
    """A local directory holding what `path` holds: `path` itself when local, else a cached copy.

    The copy is kept under a name derived from the URI and refreshed when the listing (names and
    sizes) changed; it is filled in a temporary dir and renamed into place, so a half copy is never used.
    """
    if not is_uri(path):
        return str(Path(path).expanduser().resolve())
    listing = files_under(path)
    if not listing:
        raise UserError(f"{str(path)!r} holds no file (a wrong URI, or no access to it from this machine?)")
    key = hashlib.sha256(repr((str(path), sorted(listing.items()))).encode()).hexdigest()[:24]
    target = cache_root() / key
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=target.parent))
    fs, inner = filesystem(path)
    with storage_errors(path):
        for relative in listing:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{inner.rstrip('/')}/{relative}") as stream, open(destination, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
