"""The storage directory of a durable workflow: layout, atomic commit, zero-copy reads.

Layout (``tmp/`` and ``steps/`` on one file system, so that ``link`` is atomic)::

    DIR/hoplite-storage.json      {"format": 1}
    DIR/runs/<run>.json           a run of the program: argv, host, pid, SLURM job and restart
                                  count, start, end, status (running, finished, drained, failed)
    DIR/runs/<run>.keys           the steps the run restored or committed, one key per line
                                  (``hoplite-mpi storage gc`` keeps what recent runs used)
    DIR/steps/ab/<key>.m          a step's manifest: its commit record (ab = the key's first 2 digits)
    DIR/steps/ab/<key>.<attempt>/ its large frames: r<i>.f<j>.npy (a plain numpy array, loadable
                                  with numpy.load(mmap_mode="r")) or r<i>.f<j>.bin
    DIR/tmp/                      manifests being written

A manifest is ``MAGIC``, a 4-byte little-endian header length, a JSON header (key, name,
function, rank, host, time; per return value, per frame: ``inline`` with offset, or a file;
``nbytes``; ``crc32``), then the inline frames.  ``hoplite-mpi storage`` reads headers only.

Commit (:func:`commit`): large frames are written to a fresh attempt directory and fsynced; the
manifest is written to ``tmp/`` and fsynced, then ``os.link``-ed to its name in ``steps/``,
which fails if the name exists: the first commit of a key wins and a committed step never
changes (exactly-once, ExoFlow §4).  The link is the only commit point: a process killed at any
moment leaves at most a tmp file or an attempt directory no manifest names (removed by
``hoplite-mpi storage gc``), never a partial file under a committed name.

Reads (:func:`load`) memory-map frame files (nothing is read until used) and check the crc32
of inline frames; file frames are checked by ``verify=True`` (``hoplite-mpi storage verify``).
"""
from __future__ import annotations

import itertools
import json
import mmap
import os
import socket
import struct
import time
import zlib
from typing import Any, Optional, Sequence

from .. import faults

MAGIC = b"HMSTEP1\n"
FORMAT = 1
#: frames larger than this (bytes) go to files of their own; smaller ones into the manifest
FILE_FRAME = 64 << 10
_SLICE = 4 << 20          # bytes per write (crc32 is updated on each slice while it is cache-hot)
_attempts = itertools.count()


class StorageError(Exception):
    """The storage directory is not usable (not a hoplite storage directory, wrong format,
    a damaged manifest); the message names the path."""


def open_root(root: str) -> str:
    """Create (if needed) and check a storage directory; returns its absolute path.

    Raises StorageError: ``root`` holds something else, or another format version."""
    root = os.path.abspath(root)
    for sub in ("steps", "tmp", "runs"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    marker = os.path.join(root, "hoplite-storage.json")
    if not os.path.exists(marker):
        tmp = os.path.join(root, "tmp", f"marker.{socket.gethostname()}.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT}, f)
        try:
            os.link(tmp, marker)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        with open(marker) as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError) as exc:
        raise StorageError(f"{marker}: not a hoplite_mpi storage marker ({exc})") from None
    if fmt != FORMAT:
        raise StorageError(f"{root}: storage format {fmt!r}, this version reads {FORMAT}")
    return root


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically (a temporary name, then rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def manifest_path(root: str, key: str) -> str:
    return os.path.join(root, "steps", key[:2], key + ".m")


def committed_keys(root: str) -> set[str]:
    """The keys of every committed step under ``root`` (names only: one ``scandir`` per
    subdirectory)."""
    keys: set[str] = set()
    steps = os.path.join(root, "steps")
    try:
        subdirs = [e.path for e in os.scandir(steps) if e.is_dir()]
    except FileNotFoundError:
        return keys
    for sub in subdirs:
        for entry in os.scandir(sub):
            if entry.name.endswith(".m"):
                keys.add(entry.name[:-2])
    return keys


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, parts: Sequence[Any], sync: bool, unsummed: int = 0) -> int:
    """Write ``parts`` (buffers) to a new file ``path``; returns the crc32 of all of them but
    the first ``unsummed`` (a .npy header), computed while each slice is cache-hot."""
    crc = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for i, part in enumerate(parts):
            view = memoryview(part).cast("B")
            for start in range(0, len(view), _SLICE):
                piece = view[start:start + _SLICE]
                if i >= unsummed:
                    crc = zlib.crc32(piece, crc)
                done = 0
                while done < len(piece):
                    done += os.write(fd, piece[done:])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return crc


def _npy_header(value: Any) -> Optional[bytes]:
    """The .npy (v1.0) header for ``value`` if it is a plain contiguous numpy array, else None."""
    try:
        import numpy as np
    except ImportError:
        return None
    if type(value) is not np.ndarray or value.dtype.hasobject or not (
            value.flags.c_contiguous or value.flags.f_contiguous):
        return None
    out = _Buffer()
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(value))
    return bytes(out.data)


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> None:
        self.data += b


def commit(root: str, key: str, returns: Sequence[Sequence[Any]], meta: dict,
           values: Optional[Sequence[Any]] = None, sync: bool = True) -> tuple[bool, int]:
    """Write a step's results and commit them atomically (see the module docstring).

    Args:
        root: an :func:`open_root` directory.  key: the step's durable key (hex).
        returns: per return value, its serialized frames (buffers; frame 0 the pickle stream).
        meta: JSON-able facts for the header (name, function...).
        values: per return value, the value itself if known (a plain numpy array is then
            written as ``.npy``), else None.
        sync: fsync files and directories (False: tmpfs, scratch space).

    Returns ``(committed, nbytes)``: False if the key was committed before (by another
    attempt: this one's files are removed); bytes written.  Raises OSError (nothing is
    committed; files of this attempt may remain until gc).
    """
    final = manifest_path(root, key)
    if os.path.exists(final):
        return False, 0
    subdir = os.path.dirname(final)
    os.makedirs(subdir, exist_ok=True)
    attempt = f"{socket.gethostname()}-{os.getpid()}-{next(_attempts)}"
    files_dir = os.path.join(subdir, f"{key}.{attempt}")
    header: dict = dict(meta, key=key, time=time.time(), host=socket.gethostname(), returns=[])
    inline: list[Any] = []
    offset = nbytes = 0
    made_dir = False
    for i, frames in enumerate(returns):
        frame_docs = []
        value = values[i] if values is not None else None
        for j, frame in enumerate(frames):
            view = memoryview(frame).cast("B")
            n = len(view)
            nbytes += n
            if n <= FILE_FRAME or j == 0:
                frame_docs.append({"inline": offset, "nbytes": n, "crc32": zlib.crc32(view)})
                inline.append(view)
                offset += n
                continue
            if not made_dir:
                os.mkdir(files_dir)
                made_dir = True
            npy = _npy_header(value) if j == 1 and len(frames) == 2 else None
            name = f"r{i}.f{j}." + ("npy" if npy else "bin")
            parts = [npy, view] if npy else [view]
            crc = _write_file(os.path.join(files_dir, name), parts, sync, 1 if npy else 0)
            frame_docs.append({"file": f"{key}.{attempt}/{name}", "skip": len(npy) if npy else 0,
                               "nbytes": n, "crc32": crc})     # (one pass over the data)
            faults.reached("persist")
        header["returns"].append({"frames": frame_docs})
    if made_dir and sync:
        _fsync_dir(files_dir)
    head = json.dumps(header, sort_keys=True).encode()
    tmp = os.path.join(root, "tmp", f"{key}.{attempt}.m.tmp")
    _write_file(tmp, [MAGIC, struct.pack("<I", len(head)), head, *inline], sync)
    faults.reached("persist")
    try:
        os.link(tmp, final)           # the commit point (no-replace: the first commit wins)
    except FileExistsError:
        os.unlink(tmp)
        if made_dir:
            _remove_tree(files_dir)
        return False, 0
    os.unlink(tmp)
    if sync:
        _fsync_dir(subdir)
    return True, nbytes


def _remove_tree(path: str) -> None:
    for entry in os.scandir(path):
        os.unlink(entry.path)
    os.rmdir(path)


def read_header(root: str, key: str) -> tuple[dict, int, bytes]:
    """``(header, offset of the inline frames, manifest bytes)`` of a committed step.

    Raises FileNotFoundError (not committed), StorageError (a damaged manifest)."""
    path = manifest_path(root, key)
    with open(path, "rb") as f:
        data = f.read()
    if data[:len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise StorageError(f"{path}: not a step manifest")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + n])
    except ValueError as exc:
        raise StorageError(f"{path}: damaged header ({exc})") from None
    return header, start + n, data


def load(root: str, key: str, verify: bool = False) -> Optional[list[list[Any]]]:
    """The frames of each return value of committed step ``key``, or None if it is not
    committed.  Inline frames are memoryviews of the manifest (crc32 checked); file frames are
    read-only memory maps (checked only with ``verify``: reading them all is what a lazy load
    avoids).

    Raises StorageError: a damaged manifest, a missing frame file or a crc mismatch.
    """
    try:
        header, base, data = read_header(root, key)
    except FileNotFoundError:
        return None
    subdir = os.path.dirname(manifest_path(root, key))
    whole = memoryview(data)
    out = []
    for ret in header["returns"]:
        frames: list[Any] = []
        for doc in ret["frames"]:
            n = doc["nbytes"]
            if "inline" in doc:
                view = whole[base + doc["inline"]:base + doc["inline"] + n]
                if zlib.crc32(view) != doc["crc32"]:
                    raise StorageError(f"{manifest_path(root, key)}: crc32 mismatch of an inline frame")
                frames.append(view)
                continue
            path = os.path.join(subdir, doc["file"])
            view = _map(path, doc.get("skip", 0), n)
            if verify and zlib.crc32(view) != doc["crc32"]:
                raise StorageError(f"{path}: crc32 mismatch")
            frames.append(view)
        out.append(frames)
    return out


def _map(path: str, skip: int, n: int) -> memoryview:
    """Bytes ``skip .. skip+n`` of ``path``, memory-mapped read-only (empty: b"")."""
    if n == 0:
        return memoryview(b"")
    try:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: cannot map a frame file ({exc})") from None
    if len(m) < skip + n:
        raise StorageError(f"{path}: {len(m)} bytes, the manifest says {skip + n}")
    return memoryview(m)[skip:skip + n]
