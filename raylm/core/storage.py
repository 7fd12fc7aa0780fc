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
    return {rel: size for rel, (size, _) in file_versions_under(path).items()}


def file_versions_under(path: str | Path) -> dict[str, tuple[int, int | None]]:
    """{path relative to `path`: (size, modification time in ns)} of every file below a directory:
    what tells a rewritten file from the old one, at the cost of one listing."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    with storage_errors(path):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return {info.path[len(inner.rstrip("/")) + 1 :]: (info.size, info.mtime_ns)
            for info in infos if info.type == pafs.FileType.File}


def cache_root() -> Path:
    return Path(os.environ.get("RAYLM_CACHE_DIR", Path.home() / ".cache" / "raylm")) / "remote"


def local_dir(path: str | Path) -> str:
    """A local directory holding what `path` holds: `path` itself when local, else a cached copy.

    The copy is kept under a name derived from the URI and refreshed when the listing (names, sizes
    and modification times) changed; it is filled in a temporary dir and renamed into place, so a
    half copy is never used.
    """
    if not is_uri(path):
        return str(Path(path).expanduser().resolve())
    listing = file_versions_under(path)
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


# ---- writing, listing and removing: what a run dir on object storage needs -----------------------
# On a local path these are plain file operations (atomic renames, fsync); on a URI, one object
# per file. An object store has no rename and no append: an object appears whole when its upload
# ends, which is what makes a single file's write atomic there; a dir's completeness is said by a
# file written last (a checkpoint's completion records, a model dir's config.json).


def child(base: str | Path, name: str) -> str | Path:
    """`base/name`, of the same kind as `base` (a Path stays a Path)."""
    return base / name if isinstance(base, Path) else join(base, name)


def name_of(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def list_dir(path: str | Path) -> list[tuple[str, bool]]:
    """(name, is_dir) of each entry directly under `path`; [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    with storage_errors(path):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    return sorted((info.base_name, info.type == pafs.FileType.Directory) for info in infos)


def exists(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    return file_type(path) != pafs.FileType.NotFound


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str | Path, content: str | bytes) -> None:
    """Write one file so that a reader sees the old content or the new, never a part."""
    data = content.encode() if isinstance(content, str) else content
    if not is_uri(path):
        from raylm.core.files import write_atomic

        write_atomic(path, data)
        return
    fs, inner = filesystem(path)
    with storage_errors(path), fs.open_output_stream(inner) as out:
        out.write(data)


def upload_file(source: Path, target: str | Path) -> None:
    """Copy a local file to `target`; a local target is flushed to disk before this returns (a
    completion record written after it must never describe data that is not there)."""
    if not is_uri(target):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        return
    fs, inner = filesystem(target)
    with storage_errors(target), open(source, "rb") as src, fs.open_output_stream(inner) as out:
        shutil.copyfileobj(src, out, 16 << 20)


def upload_dir(source: Path, target: str | Path, last: tuple[str, ...] = ()) -> None:
    """Copy a local dir's files under `target`; the files named in `last` (relative paths) go last."""
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    for rel in sorted(files, key=lambda rel: rel in last):
        upload_file(source / rel, join(target, rel) if is_uri(target) else Path(target) / rel)


def download_dir(source: str | Path, target: Path, only: set[str] | None = None) -> list[str]:
    """Copy the files under `source` into the local dir `target`, or only the relative paths in
    `only` (which the caller has seen there: they are not listed again, since listing a run dir
    on object storage lists every checkpoint); returns the relative paths copied."""
    fs, inner = filesystem(source)
    copied = []
    for rel in sorted(only) if only is not None else files_under(source):
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        with storage_errors(source), fs.open_input_stream(f"{inner.rstrip('/')}/{rel}") as stream, open(destination, "wb") as out:
            shutil.copyfileobj(stream, out, 16 << 20)
        copied.append(rel)
    return copied


def remove(path: str | Path) -> None:
    """Remove a file or a whole dir; nothing to remove is fine."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    with storage_errors(path):
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(inner)
        elif kind == pafs.FileType.File:
            fs.delete_file(inner)


def move_dir(source: str | Path, target: str | Path) -> None:
    """Rename a dir (an object store copies each file, then removes the source)."""
    if not is_uri(source):
        os.replace(source, target)
        return
    fs, inner = filesystem(source)
    _, inner_target = filesystem(target)
    with storage_errors(source):
        for rel in files_under(source):
            fs.copy_file(f"{inner.rstrip('/')}/{rel}", f"{inner_target.rstrip('/')}/{rel}")
    remove(source)


def file_ends_sha256(path: str | Path, size: int, ends: int) -> str:
    """sha256 of a file's first and last `ends` bytes (two ranged reads on an object store)."""
    fs, inner = filesystem(path)
    digest = hashlib.sha256()
    with storage_errors(path), fs.open_input_file(inner) as f:
        digest.update(f.read(ends))
        f.seek(max(size - ends, 0))
        digest.update(f.read(ends))
    return digest.hexdigest()


def make_dir(path: str | Path) -> None:
    """Create a dir (on an object store, an empty marker object that listings show as a dir)."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        return
    fs, inner = filesystem(path)
    with storage_errors(path):
        fs.create_dir(inner, recursive=True)


def parent_of(path: str | Path) -> str:
    """The dir holding `path`: a URI's parent as a URI, a local path's as an absolute path."""
    if is_uri(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).expanduser().resolve().parent)


@contextmanager
def dir_written_whole(out: str | Path):
    """Yield where to build the dir `out` so that it never looks complete before it is.

    Local: a hidden sibling, renamed into place on success (raylm/core/files.py's atomic_dir).
    Object storage has no rename: the old dir is removed first, the dir is built in place, and the
    caller writes the file that makes it complete (a manifest, a config.json) last; on an
    exception what was written is removed again.
    """
    from raylm.core.files import atomic_dir

    if not is_uri(out):
        with atomic_dir(Path(out)) as building:
            yield building
        return
    out = str(out).rstrip("/")
    remove(out)
    try:
        yield out
    except BaseException:
        remove(out)
        raise


def write_parquet(table, path: str | Path, **options) -> str:
    """Write a Parquet file whole (atomically on a local disk, as one object on a store); returns
    its sha256, computed from the bytes written rather than read back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    data = sink.getvalue().to_pybytes()
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


@contextmanager
def staged_locally(target: str | Path):
    """Yield a local dir to write `target`'s files into: `target` itself when local; for a URI, a
    temporary dir whose files are copied to `target` on success (for writers that take only a path)."""
    if not is_uri(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    with tempfile.TemporaryDirectory(prefix="raylm-stage-") as local:
        yield Path(local)
        upload_dir(Path(local), target)
