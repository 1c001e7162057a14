"""Conditional writes: create a file only if absent, replace or remove it only if it is still the
version that was read. The output lock (pipelines/lock.py) is built on them, through `OutputDir`.

Each is decided by the store in one step where it can:

- locally, a file is created by link(2) of a complete temporary file, which fails if the name
  exists (atomic on POSIX filesystems, NFS included, and the file appears whole; O_EXCL where the
  filesystem has no hard links). It is removed by renaming it to a unique name first (of two
  removers of one file one rename succeeds), then deleted if its bytes are those meant, else put
  back. A replacement is read, compare, rename: never missing, but not atomic (nothing on POSIX is);
- on S3, PutObject with IfNoneMatch="*" creates, IfMatch=<ETag> replaces, and DeleteObject with
  IfMatch=<ETag> removes, only the version read (AWS: conditional writes since 2024-11, deletes
  since 2025-09; moto's server honours all three);
- on GCS (gcsfs), `pipe_file(mode="create")` sends ifGenerationMatch=0 and a delete carries
  ifGenerationMatch=<generation>; gcsfs has no generation-conditional upload, so a replacement is
  read, compare, write;
- elsewhere (memory://, an S3 store that answers NotImplemented, a botocore too old to send the
  condition) each is check, write, read back: `atomic` is False and two writers in one instant may
  both succeed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import time
import uuid
from typing import NamedTuple

import fsspec
import fsspec.asyn

log = logging.getLogger("ssl_prune")


class Versioned(NamedTuple):
    """A file's bytes and the version a conditional write compares: their sha256 locally, the
    ETag on S3, the generation on GCS."""

    data: bytes
    version: str


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckThenWrite:
    """A store with no conditional write: check, write, read back. Two writers in the same
    instant can both pass the check; the read-back catches most such races, not all."""

    atomic = False

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def create(self, path: str, data: bytes) -> bool:
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return self._holds(path, data)

    def read(self, path: str) -> Versioned | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return Versioned(data, _digest(data))

    def replace(self, path: str, data: bytes, version: str) -> bool:
        if not self._unchanged(path, version):
            return False
        self.fs.pipe_file(path, data)
        return True

    def remove(self, path: str, version: str) -> bool:
        if not self._unchanged(path, version):
            return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def _unchanged(self, path: str, version: str) -> bool:
        held = self.read(path)
        return held is not None and held.version == version

    def _holds(self, path: str, data: bytes) -> bool:
        """Our bytes are there: the last of two writers wins, the other learns it lost."""
        held = self.read(path)
        return held is not None and held.data == data


# link(2) not supported by this filesystem (FAT, some FUSE mounts): create with O_EXCL instead
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})


def _sibling(path: str, kind: str) -> str:
    """A hidden unique name in the same directory (a rename or link there stays atomic)."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{kind}-{uuid.uuid4().hex}-{name}")


def _write_new(path: str, data: bytes) -> bool:
    """Create `path` with O_EXCL and write it (False: it exists). A reader may see it partial."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return True


class LocalConditional(CheckThenWrite):
    """POSIX files: link(2) creates, rename(2) to a unique name first removes (see module doc)."""

    atomic = True

    def create(self, path: str, data: bytes) -> bool:
        tmp = self._complete_tmp(path, data)
        try:
            return self._link(tmp, path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read(self, path: str) -> Versioned | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return Versioned(data, _digest(data))

    def replace(self, path: str, data: bytes, version: str) -> bool:
        """Read, compare, rename over: the name never goes missing, but the compare is not
        atomic with the rename (nothing on POSIX is); the window is the few microseconds between."""
        tmp = self._complete_tmp(path, data)  # written first: the window holds only the compare
        try:
            if not self._unchanged(path, version):
                return False
            os.replace(tmp, path)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def remove(self, path: str, version: str) -> bool:
        """Compare-and-delete: of removers racing for the same file one rename wins; the winner
        deletes it only if it is the version meant, and otherwise puts it back."""
        aside = _sibling(path, "removing")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False  # another remover (or the owner) got it first
        with open(aside, "rb") as f:
            data = f.read()
        if _digest(data) == version:
            os.unlink(aside)
            return True
        if not self._link(aside, path, data):  # changed since it was read: restore it
            log.warning(
                "%s changed while being removed and a new file took its name meanwhile; the changed one is dropped",
                path,
            )
        os.unlink(aside)
        return False

    @staticmethod
    def _complete_tmp(path: str, data: bytes) -> str:
        """A hidden sibling holding `data`, on disk (fsync) before it gets its final name."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _sibling(path, "tmp")
        _write_new(tmp, data)
        return tmp

    @staticmethod
    def _link(src: str, path: str, data: bytes) -> bool:
        """Give the complete file `src` the name `path` if no file has it (False otherwise)."""
        try:
            os.link(src, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _write_new(path, data)
        return True


@functools.cache
def _botocore_sends(operation: str, param: str) -> bool:
    """The installed botocore knows the parameter (s3fs silently drops the ones it does not)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    return param in model.operation_model(operation).input_shape.members


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (ClientError is its __cause__)."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code", "")


async def _s3_get(fs, bucket: str, key: str) -> Versioned:
    """Bytes and ETag from one GET, so the two always belong to the same version."""
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return Versioned(await resp["Body"].read(), resp["ETag"])
    finally:
        resp["Body"].close()


_S3_CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict: another conditional write is in flight


class S3Conditional(CheckThenWrite):
    """S3: IfNoneMatch="*" / IfMatch=<ETag> on PutObject and DeleteObject (AWS: conditional
    writes since 2024-11, conditional deletes since 2025-09). Where the store answers
    NotImplemented, or botocore cannot send the condition, that operation checks, writes, reads back."""

    atomic = True

    def __init__(self, fs):
        super().__init__(fs)
        self._unsupported: set[tuple[str, str]] = set()  # (method, condition)

    def create(self, path: str, data: bytes) -> bool:
        done = self._send("put_object", path, Body=data, IfNoneMatch="*")
        if done is None:
            return super().create(path, data)
        # a store that ignores IfNoneMatch lets both writers "create": the last one's bytes are there
        return done and self._holds(path, data)

    def read(self, path: str) -> Versioned | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            return fsspec.asyn.sync(self.fs.loop, _s3_get, self.fs, bucket, key)
        except FileNotFoundError:
            return None

    def replace(self, path: str, data: bytes, version: str) -> bool:
        done = self._send("put_object", path, Body=data, IfMatch=version)
        return super().replace(path, data, version) if done is None else done

    def remove(self, path: str, version: str) -> bool:
        done = self._send("delete_object", path, IfMatch=version)
        return super().remove(path, version) if done is None else done

    def _send(self, method: str, path: str, **params) -> bool | None:
        """True: done; False: the condition failed (or the object is absent); None: this store or
        botocore cannot do it conditionally."""
        condition = next(k for k in params if k.startswith("If"))
        operation = "".join(w.title() for w in method.split("_"))  # put_object -> PutObject
        if (method, condition) in self._unsupported or not _botocore_sends(operation, condition):
            self._fall_back(method, condition)
            return None
        bucket, key, _ = self.fs.split_path(path)
        for attempt in range(_S3_CONFLICT_RETRIES):
            try:
                self.fs.call_s3(method, Bucket=bucket, Key=key, **params)
            except FileExistsError:  # IfNoneMatch: the object exists
                return False
            except FileNotFoundError as exc:  # IfMatch: the object is gone (a missing bucket is an error)
                if _s3_error_code(exc) == "NoSuchBucket":
                    raise
                return False
            except OSError as exc:
                code = _s3_error_code(exc)
                if code == "ConditionalRequestConflict":
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if code == "PreconditionFailed":
                    return False
                if code == "NotImplemented":
                    self._fall_back(method, condition)
                    return None
                raise
            self.fs.invalidate_cache(path)
            return True
        return False  # another conditional write of the key kept conflicting: it is the one that lands

    def _fall_back(self, method: str, condition: str) -> None:
        if (method, condition) not in self._unsupported:
            self._unsupported.add((method, condition))
            if condition == "IfNoneMatch":
                self.atomic = False
            log.warning(
                "this S3 store (or botocore) has no conditional %s with %s: it is checked, "
                "written and read back instead, not atomically",
                method,
                condition,
            )


class GCSConditional(CheckThenWrite):
    """GCS (gcsfs, untested here: gcsfs is not a dependency): create with ifGenerationMatch=0
    through gcsfs's `pipe_file(mode="create")`, delete with ifGenerationMatch=<generation>.
    gcsfs has no generation-conditional upload, so a replacement is read, compare, write."""

    atomic = True

    def create(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:  # gcsfs: HTTP 412, the generation precondition failed
            return False
        except TypeError:  # a gcsfs too old for mode="create"
            self.atomic = False
            log.warning(
                "gcsfs has no pipe_file(mode='create'): creation is checked, written and "
                "read back instead, not atomically"
            )
            return super().create(path, data)
        return True

    def read(self, path: str) -> Versioned | None:
        """Generation first: if the object changes before the bytes are read, the generation is
        the older one and a conditional write with it fails, which is the safe way to be wrong."""
        try:
            generation = self.fs.info(path)["generation"]
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return Versioned(data, str(generation))

    def remove(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):  # 412: another generation; 404: gone
            return False
        self.fs.invalidate_cache(path)
        return True
