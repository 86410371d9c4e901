"""Where a path lives, in one module every caller goes through: a local path or an object store (``s3://bucket/key``,
``gs://bucket/key``).

The path abstraction is ``etils.epath`` (``as_path``): it is what orbax takes and returns, so a run directory given
as ``s3://...`` reaches the checkpoint manager as the same object the rest of the library reads its files with, and
it speaks S3 and GCS through fsspec (``s3fs``, ``gcsfs``). Local paths stay ``pathlib.Path``: file locks, renames
and ``O_EXCL`` keep their POSIX meaning there.

Endpoints and credentials come only from the ecosystem's own variables, read by the client libraries:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or any other botocore source) for S3;
``STORAGE_EMULATOR_HOST`` / application-default credentials for GCS. Nothing here prints a credential: errors name
the URL and the server's error code.

Checkpoints go to the bucket natively (TensorStore's ``s3`` and ``gcs`` drivers under orbax; :func:`use_orbax`),
committed the way object stores allow: orbax's commit marker (``commit_success.txt``), no rename. The small files
of a run (config, metrics, TensorBoard events, summary, plots) are written to a local working copy and copied to
the bucket at every checkpoint and when the job ends (:func:`push`); a ``kill -9`` loses at most the metrics since
the last checkpoint, which the resume rewrites anyway. The one-writer lock is a conditional create
(:func:`create_exclusive`: S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SCHEMES = ("s3://", "gs://")
COMMIT_MARKER = "commit_success.txt"  # orbax's: a checkpoint step (and each of its items) is whole once it exists

__all__ = ["SCHEMES", "StorageError", "as_path", "cache_root", "cached", "check_writable", "create_exclusive",
           "file_sha256", "files_under", "is_remote", "name", "push", "read_bytes", "remove_tree", "total_size",
           "working_copy"]


class StorageError(OSError):
    """An object store cannot be used as asked (no such bucket, access denied, the server unreachable); the message
    names the URL and the reason, never a credential."""


def is_remote(path: Any) -> bool:
    return str(path).startswith(SCHEMES)


# Requests to a bucket are retried with backoff (botocore's "standard" mode: up to 20 s between attempts) before
# an error is raised: a server gone for 10-30 s (restarted, failed over) is ridden through, measured against the
# S3 server on loopback (tests/test_storage.py); with botocore's default of 5 quick attempts, a 30 s outage stopped
# the run. A user's own AWS_MAX_ATTEMPTS / AWS_RETRY_MODE win.
MAX_ATTEMPTS = 20


def attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or MAX_ATTEMPTS)


@functools.lru_cache(maxsize=None)
def _retry_with_backoff() -> None:
    import fsspec.config

    retries = {"max_attempts": attempts(), "mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    conf = fsspec.config.conf.setdefault("s3", {})  # every S3 filesystem fsspec makes: epath's, orbax's, ours
    conf.setdefault("config_kwargs", {}).setdefault("retries", retries)


def as_path(path: Any):
    """``path`` as the object to read and write it through: ``pathlib.Path`` for a local path, ``epath.Path`` for an
    object-store URL."""
    if is_remote(path):
        from etils import epath

        _retry_with_backoff()
        return epath.Path(str(path).rstrip("/"))
    return Path(path)


def split(url: Any) -> tuple[str, str, str]:
    """``s3://bucket/a/b`` -> ``("s3", "bucket", "a/b")``."""
    scheme, _, rest = str(url).partition("://")
    bucket, _, key = rest.strip("/").partition("/")
    return scheme, bucket, key


def name(url: Any) -> str:
    """The last part of ``url``'s key (a directory's name)."""
    return split(str(url).rstrip("/"))[2].rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str):
    import fsspec

    _retry_with_backoff()
    # no listings cache: a run's objects are rewritten by other processes (a resume elsewhere, the next push), and
    # a cached listing then read a replaced object as FileExpired
    return fsspec.filesystem(scheme, use_listings_cache=False)


def _fs(url: Any):
    return _filesystem(split(url)[0])


def _key(url: Any) -> str:
    _, bucket, key = split(url)
    return f"{bucket}/{key}".rstrip("/")


def files_under(root: Any) -> list:
    """Every file under ``root``, recursively (epath does not glob ``**`` on object stores)."""
    if not is_remote(root):
        root = Path(root)
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    scheme = split(root)[0]
    return [as_path(f"{scheme}://{k}") for k in sorted(_fs(root).find(_key(root)))]


def size(path: Any) -> int:
    return _fs(path).size(_key(path)) if is_remote(path) else Path(path).stat().st_size


def remove_tree(path: Any) -> None:
    """Remove ``path`` and everything under it; what is already gone is not an error."""
    if is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            _fs(path).rm(_key(path), recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(src: Any, dest: Any) -> None:
    """Rename a file or directory; on an object store a copy of every object, then the originals removed."""
    if is_remote(src):
        fs = _fs(src)
        fs.copy(_key(src), _key(dest), recursive=True)
        fs.rm(_key(src), recursive=True)
    else:
        Path(src).rename(dest)


def copy_tree(src: Any, dest: Any, last: str | None = None) -> None:
    """Copy directory ``src`` to ``dest``; on an object store object by object, those named ``last`` (a commit
    marker) after all others and the one at the top of the tree the very last, so that ``dest`` is whole exactly
    when its top-level marker exists."""
    if not is_remote(src):
        shutil.copytree(src, dest)
        return
    base = str(src).rstrip("/")
    files = [str(f)[len(base) + 1:] for f in files_under(src)]
    order = sorted(files, key=lambda rel: (rel.rsplit("/", 1)[-1] == last, rel == last))
    fs = _fs(src)
    try:
        for rel in order:
            fs.copy(_key(f"{base}/{rel}"), _key(f"{str(dest).rstrip('/')}/{rel}"))
    except Exception as e:  # noqa: BLE001 - client errors are many types; the message is what matters
        raise _storage_error(dest, e) from None


# ---- the primitives of a lock: a conditional create, an age, a removal ------------------------------------------
def create_exclusive(path: Any, data: bytes) -> bool:
    """Create file ``path`` holding ``data`` unless it exists (False then), atomically: ``O_CREAT | O_EXCL`` on a
    local filesystem, a conditional PUT on S3 (``If-None-Match: *``) and GCS (``ifGenerationMatch=0``)."""
    if not is_remote(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    scheme, bucket, key = split(path)
    if scheme == "s3":
        import botocore.exceptions

        try:
            _s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise _storage_error(path, e) from None
        return True
    from google.api_core import exceptions as gexc  # gcsfs's dependency, the GCS client's errors

    try:
        _gcs_bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except gexc.PreconditionFailed:
        return False
    return True


def read_bytes(path: Any) -> bytes | None:
    """The file's bytes; None if it does not exist."""
    try:
        return _fs(path).cat_file(_key(path)) if is_remote(path) else Path(path).read_bytes()
    except FileNotFoundError:
        return None


def age_s(path: Any) -> float | None:
    """Seconds since ``path`` was last written (None: it does not exist)."""
    try:
        if not is_remote(path):
            return time.time() - Path(path).stat().st_mtime
        modified = _fs(path).modified(_key(path))
    except FileNotFoundError:
        return None
    return time.time() - modified.timestamp()


def rewrite(path: Any, data: bytes) -> None:
    """Write ``path`` again (a heartbeat: its age starts over)."""
    if is_remote(path):
        as_path(path).write_bytes(data)
    else:
        os.utime(path)


def delete(path: Any) -> None:
    with contextlib.suppress(FileNotFoundError):
        _fs(path).rm_file(_key(path)) if is_remote(path) else Path(path).unlink()


# ---- this machine's side: its work directory, its cache of immutable objects -----------------------------------
def work_root() -> Path:
    """Where this machine keeps what it makes for or copies from a bucket: ``$GPTJAX_WORK_DIR``, default the
    system's temporary directory."""
    return Path(os.environ.get("GPTJAX_WORK_DIR") or tempfile.gettempdir())


def cache_root() -> Path:
    """Where a host keeps its copies of a bucket's immutable objects: ``$GPTJAX_CACHE_DIR``, else ``gptjax-cache``
    under ``$GPTJAX_WORK_DIR`` (default: the system's temporary directory). Shared by the host's processes and
    runs, kept between them."""
    explicit = os.environ.get("GPTJAX_CACHE_DIR")
    return Path(explicit) if explicit else work_root() / "gptjax-cache"


def cached(url: Any, name: str, sha256: str | None = None) -> Path:
    """A local copy of the object at ``url`` in the host's cache under ``name``, which the caller makes name the
    content (a prepared shard's SHA-256): downloaded the first time (checked against ``sha256`` when given: a
    damaged download is a :class:`StorageError`, nothing is kept), under a temporary name renamed whole (a reader
    never sees part of one; two processes fetching it at once both end with the whole file)."""
    local = cache_root() / name
    if local.is_file():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _fs(url).get_file(_key(url), str(tmp))
        if sha256 is not None and file_sha256(tmp) != sha256:
            raise StorageError(f"{url} arrived with another SHA-256 than its manifest's: the object was changed "
                               "after it was written (prepare the directory again)")
        os.replace(tmp, local)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - client errors are many types; the message is what matters
        raise _storage_error(url, e, "read") from None
    finally:
        tmp.unlink(missing_ok=True)
    return local


def file_sha256(path: Any, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, local or an object in a bucket (read as a stream)."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def total_size(url: Any) -> int:
    """Bytes of every object under ``url``."""
    return int(_fs(url).du(_key(url))) if is_remote(url) else sum(f.stat().st_size for f in files_under(url))


def staging_dir(url: Any) -> Path:
    """A local directory in which something bound for ``url`` is made before it is copied up: under
    ``$GPTJAX_WORK_DIR`` (default: the system's temporary directory), named by the URL, so that work cut short is
    found again by the next attempt on this machine."""
    return work_root() / f"gptjax-staging-{name(url)}-{hashlib.sha256(str(url).rstrip('/').encode()).hexdigest()[:12]}"


# ---- a run directory on a bucket: its working copy -------------------------------------------------------------
def working_copy(url: Any, skip: tuple[str, ...] = ()) -> Path:
    """This process's local copy of the small files of the run directory on ``url`` (the bucket holds the
    checkpoints, and the rest as of the last :func:`push`): a temporary directory under ``$GPTJAX_WORK_DIR``
    (default: the system's), filled from the bucket the first time the process names the run (top-level names in
    ``skip`` left out) and removed when it exits. One per process, so that a second process naming the same run
    (a writer being refused, a reader) never touches the first one's files."""
    key = str(url).rstrip("/")
    if key not in _copies:
        root = work_root()
        root.mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix=f"gptjax-{split(key)[1]}-", dir=root))
        atexit.register(lambda: key in _copies and local not in _kept and shutil.rmtree(local, True))
        pull(key, local, skip)
        _copies[key] = local
    return _copies[key]


_copies: dict[str, Path] = {}  # run URL -> this process's working copy
_kept: set[Path] = set()  # working copies not removed at exit (their files could not be copied up)


def keep(url: Any) -> Path | None:
    """Leave this process's working copy of ``url`` in place at exit (its newest files could not be copied to the
    bucket); returns where it is."""
    local = _copies.get(str(url).rstrip("/"))
    if local is not None:
        _kept.add(local)
    return local
_pushed: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime_ns) when last copied to its bucket


def push(local: Path, url: Any, skip: tuple[str, ...] = (), last: tuple[str, ...] = ()) -> int:
    """Copy the files of ``local`` that changed since the last push to ``url`` (top-level names in ``skip`` and
    temporary siblings left out; those in ``last`` after all others: a marker that says the rest is whole); each
    object is written whole. Returns the number copied."""
    copied = 0
    for f in sorted(files_under(local), key=lambda f: f.relative_to(local).parts[0] in last):
        rel = f.relative_to(local)
        if rel.parts[0] in skip or ".tmp-" in f.name:
            continue
        st = f.stat()
        if _pushed.get(str(f)) == (st.st_size, st.st_mtime_ns):
            continue
        try:  # streamed from the file (an export's weights are gigabytes)
            _fs(url).put_file(str(f), _key(f"{str(url).rstrip('/')}/{rel.as_posix()}"))
        except FileNotFoundError:
            continue  # removed while we copied (a temporary file renamed into place): the next push has it
        except Exception as e:  # noqa: BLE001 - client errors are many types; the message is what matters
            raise _storage_error(url, e) from None
        _pushed[str(f)] = (st.st_size, st.st_mtime_ns)
        copied += 1
    return copied


def pull(url: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    """Copy the files under ``url`` (top-level names in ``skip`` left out) into ``local``, over what is there."""
    copied = 0
    try:
        remote = files_under(url)
    except FileNotFoundError:
        remote = []
    except Exception as e:  # noqa: BLE001
        raise _storage_error(url, e, "read") from None
    for f in remote:
        rel = str(f)[len(url.rstrip("/")) + 1:]
        if rel.split("/")[0] in skip or ".gptjax-probe-" in rel:
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.write_bytes(read_bytes(f))
        except OSError as e:  # (a PermissionError from s3fs, the server gone)
            raise _storage_error(url, e, "read") from None
        st = dest.stat()
        _pushed[str(dest)] = (st.st_size, st.st_mtime_ns)  # already in the bucket
        copied += 1
    return copied


def check_writable(url: Any) -> None:
    """Raise :class:`StorageError` (one line: the URL and why) unless an object can be written under ``url`` and
    removed again: a bucket that does not exist, denied writes or an unreachable server are found at start-up,
    before any compute."""
    probe = f"{str(url).rstrip('/')}/.gptjax-probe-{uuid.uuid4().hex}"
    try:
        as_path(probe).write_bytes(b"")
        delete(probe)
    except Exception as e:  # noqa: BLE001
        raise _storage_error(url, e) from None


def _storage_error(url: Any, e: BaseException, verb: str = "write to") -> StorageError:
    code = ""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
    text = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    reasons = {"NoSuchBucket": "the bucket does not exist", "404": "the bucket does not exist",
               "AccessDenied": "access denied (check the credentials in the environment)",
               "403": "access denied (check the credentials in the environment)"}
    denied = isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text  # (s3fs: PermissionError)
    why = reasons.get(code) or ("the bucket does not exist" if "NoSuchBucket" in text or "does not exist" in text
                                else reasons["AccessDenied"] if denied
                                else unreachable() if "EndpointConnectionError" in text or "connect" in text.lower()
                                else text)
    return StorageError(f"cannot {verb} {url}: {why}")


def unreachable() -> str:
    """Why a request failed when the server did not answer: after the retries (noted: :func:`gave_up_since`)."""
    _gave_up.append(time.monotonic())
    where = os.environ.get("AWS_ENDPOINT_URL") or "the storage service"
    return f"{where} did not answer ({attempts()} attempts with backoff)"


_gave_up: list[float] = []  # when requests gave up on a server that did not answer


def gave_up_since(t: float) -> bool:
    """Requests gave up on an unanswering server since ``time.monotonic()`` was ``t``: what is left to do on the
    way out is not retried for minutes again."""
    return any(when >= t for when in _gave_up)


@functools.lru_cache(maxsize=None)
def _s3():
    import boto3
    import fsspec.config
    from botocore.config import Config

    _retry_with_backoff()  # the same retries as the filesystems'; endpoint and credentials: from the environment
    return boto3.client("s3", config=Config(retries=dict(fsspec.config.conf["s3"]["config_kwargs"]["retries"])))


@functools.lru_cache(maxsize=None)
def _gcs_bucket(name: str):
    from google.cloud import storage

    return storage.Client().bucket(name)  # STORAGE_EMULATOR_HOST / application-default credentials


# ---- orbax on S3 ------------------------------------------------------------------------------------------------
def s3_kvstore(url: str) -> dict:
    """TensorStore's ``s3`` kvstore for ``url``; TensorStore does not read ``AWS_ENDPOINT_URL`` (it goes to AWS,
    which hangs without internet), so the endpoint is passed from it."""
    _, bucket, key = split(url)
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    if os.environ.get("AWS_ENDPOINT_URL"):
        spec["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # (its default chain first reads ~/.aws/*, an error line per file)
        spec["aws_credentials"] = {"type": "environment"}
    # the retries of every other client here (TensorStore's own default, 32 up to 32 s apart, took 15 minutes to
    # report a server that was gone)
    spec["context"] = {"s3_request_retries": {"max_retries": attempts(), "initial_delay": "1s", "max_delay": "20s"}}
    return spec


def kvstore(directory: Any) -> str | dict:
    """TensorStore's kvstore for the directory ``directory`` (a reader opening a checkpoint's stores itself)."""
    if not is_remote(directory):
        return f"file://{Path(directory).absolute()}/"
    scheme, bucket, key = split(directory)
    if scheme == "s3":
        return {**s3_kvstore(str(directory)), "path": f"{key}/"}
    return {"driver": "gcs", "bucket": bucket, "path": f"{key}/"}


@functools.lru_cache(maxsize=None)
def use_orbax() -> None:
    """Let orbax write ``s3://`` checkpoints with TensorStore's S3 driver. orbax 0.12 has a native branch for
    ``gs://`` only and sends every other path to TensorStore's ``file`` driver (``s3:/bucket`` was then refused as
    "not absolute"); its GCS branch is the one an object store needs (no rename: a commit marker), so ``s3://``
    goes down it with an S3 kvstore."""
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    use_gcs, gcs_kvstore, normalize = ts_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs, ts_utils._normalize_path
    ts_utils._use_gcs_driver = lambda directory: directory.startswith("s3://") or use_gcs(directory)
    gcs_utils.get_kvstore_for_gcs = lambda path: s3_kvstore(path) if path.startswith("s3://") else gcs_kvstore(path)
    ts_utils._normalize_path = lambda path: normalize(path).replace("s3:/", "s3://", 1) \
        if path.startswith("s3://") else normalize(path)


def orbax_options(directory: Any) -> dict:
    """What an orbax ``CheckpointManagerOptions`` needs for ``directory``: on an object store, the commit-marker
    temporary path (orbax's default outside GCS renames a temporary directory: a copy of every object on S3)."""
    if not is_remote(directory):
        return {}
    use_orbax()
    import orbax.checkpoint as ocp

    return {"temporary_path_class": ocp.path.atomicity.CommitFileTemporaryPath}

