"""Checkpoint folders written atomically: at every instant the path holds the old or the new checkpoint.

    >>> check_target(folder)           # refuse a file or a foreign folder, before writing anything
    >>> tmp = temp_folder(folder)      # a hidden sibling on the same file system
    >>> ...                            # write the weights, then the manifest (last)
    >>> commit_folder(tmp, folder)     # swap it in, keep the user's other files, clean up

Replacing an existing checkpoint uses Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps the
two folders in one step. Where that is unavailable it falls back to two renames (old ->
``.old-*``, temp -> folder); a crash between them leaves the path empty for a moment, and
:func:`recover` (called by ``load``) then finds the previous checkpoint in the ``.old-*`` sibling.
Every save removes the stale ``.tmp-*``/``.old-*`` siblings of its path that crashed saves left.
Files the user put into a checkpoint folder (``notes.txt``) are carried into the new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import uuid

from .._log import get_logger
from ..errors import FormatError
from .manifest import MANIFEST, WEIGHTS

log = get_logger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_OWN = {MANIFEST, WEIGHTS, "config.json", "generation_config.json"}  # a checkpoint's own files
_SIBLING = re.compile(r"\.(tmp|old)-(\d+)-[0-9a-f]{8}-(.*)")


def check_target(folder: str) -> None:
    """Refuse to write over a file or over a non-empty folder that is not a brainsurgeon checkpoint."""
    if os.path.isfile(folder):
        raise FormatError(f"{folder!r} is a file; save() writes a folder. Pass a new or checkpoint folder path")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST)):
        raise FormatError(f"{folder!r} exists, is not empty and is not a brainsurgeon checkpoint; refusing to "
                          f"replace it. Pass a new folder path or delete it first")


def _sibling(folder: str, kind: str) -> str:
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder),
                        f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(folder)}")


def temp_folder(folder: str) -> str:
    """A fresh hidden temp folder beside `folder` (same file system, so the final rename is atomic)."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    tmp = _sibling(folder, "tmp")
    os.mkdir(tmp)
    return tmp


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS/file system can't."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _carry_user_files(old: str, tmp: str) -> list[str]:
    """Hard-link (or copy) every entry of `old` that the new checkpoint does not write into `tmp`."""
    carried = []
    for entry in sorted(os.listdir(old)):
        src, dst = os.path.join(old, entry), os.path.join(tmp, entry)
        if entry in _OWN or os.path.lexists(dst):
            continue  # a file of the checkpoint itself: the new one replaces it
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)
        carried.append(entry)
    return carried


def commit_folder(tmp: str, folder: str) -> None:
    """Move a fully written temp folder to `folder`, replacing an older checkpoint there atomically.

    The user's other files in the old folder are carried over; stale siblings are removed afterwards.
    """
    folder = os.path.abspath(folder)
    if os.path.isdir(folder):
        carried = _carry_user_files(folder, tmp)
        if carried:
            log.info("kept %d file(s) of yours in %s: %s", len(carried), folder, carried[:5])
        if _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old checkpoint
        else:
            old = _sibling(folder, "old")
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    clean_stale(folder)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _siblings(folder: str) -> list[tuple[str, str, int]]:
    """(path, kind, pid) of every ``.tmp-*``/``.old-*`` sibling of `folder`."""
    folder = os.path.abspath(folder)
    parent, base = os.path.split(folder)
    out = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        m = _SIBLING.fullmatch(entry)
        if m and m.group(3) == base:
            out.append((os.path.join(parent, entry), m.group(1), int(m.group(2))))
    return out


def clean_stale(folder: str) -> list[str]:
    """Remove the ``.tmp-*``/``.old-*`` siblings of `folder` left by saves whose process is gone.

    Only called once `folder` holds a complete checkpoint, so nothing recoverable is lost.
    """
    removed = []
    for path, _, pid in _siblings(folder):
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(os.path.basename(path))
    if removed:
        log.info("removed %d stale temp folder(s) of interrupted saves of %s: %s", len(removed), folder, removed)
    return removed


def recover(folder: str) -> str | None:
    """The checkpoint to read for `folder` when a save was interrupted between its two renames.

    Returns `folder` when it holds a manifest, else the newest complete ``.old-*`` sibling (the
    previous checkpoint), else None.
    """
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return folder
    olds = [p for p, kind, _ in _siblings(folder) if kind == "old" and os.path.isfile(os.path.join(p, MANIFEST))]
    if not olds:
        return None
    best = max(olds, key=lambda p: os.path.getmtime(os.path.join(p, MANIFEST)))
    log.warning("%s is missing: a save was interrupted; reading the previous checkpoint from %s", folder, best)
    return best
