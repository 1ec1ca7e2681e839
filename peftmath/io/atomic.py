"""Atomic outputs: everything is written to a temporary sibling of the target and renamed into place.

Temporary siblings are named ``.<target name>.pid<PID>.<random>.peftmath-<kind>``, so that a later run
can tell the leftovers of a process that was killed (SIGKILL, power loss) from the work of one that still
runs: :func:`clean_stale_siblings` removes the former and keeps the latter.

Modes: ``mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders whatever the umask; a temporary that
becomes an output would then be unreadable by every other user (a model server running as another
account). :func:`temp_sibling` therefore gives its result the mode a plain ``open`` / ``mkdir`` would
(``cp`` and ``save_pretrained`` alike): ``0o666 & ~umask`` for a file, ``0o777 & ~umask`` for a folder.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["temp_sibling", "clean_stale_siblings", "current_umask"]

_PATTERN = re.compile(r"\.pid(\d+)\.[^/]*\.peftmath-[a-z]+(\.[a-z]+)?$")


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc/self/status).

    Elsewhere it is set and restored at once (``os.umask`` has no read-only form), which another thread
    creating a file in that instant could observe.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_sibling(target: Path, *, folder: bool = False, kind: str = "tmp") -> Path:
    """Create and return a fresh temporary file (or folder) beside ``target`` (same file system), with
    the mode a new file (``0o666 & ~umask``) or folder (``0o777 & ~umask``) gets, as it may become
    ``target`` by a rename."""
    target = Path(target)
    prefix = f".{target.name}.pid{os.getpid()}."
    suffix = f".peftmath-{kind}"
    if folder:
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        os.close(fd)
        path = Path(name)
    try:
        os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())
    except BaseException:
        if folder:
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale_siblings(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` left by peftmath processes that no longer run."""
    target = Path(target)
    removed = []
    for name in glob.glob(os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.pid*.peftmath-*")):
        m = _PATTERN.search(name)
        if m is None or _alive(int(m.group(1))):
            continue
        p = Path(name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
