"""Atomic outputs: everything is written to a temporary sibling of the target and renamed into place.

Temporary siblings are named ``.<target name>.pid<PID>.<random>.peftmath-<kind>``, so that a later run
can tell the leftovers of a process that was killed (SIGKILL, power loss) from the work of one that still
runs: :func:`clean_stale_siblings` removes the former and keeps the latter.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["temp_sibling", "clean_stale_siblings"]

_PATTERN = re.compile(r"\.pid(\d+)\.[^/]*\.peftmath-[a-z]+(\.[a-z]+)?$")


def temp_sibling(target: Path, *, folder: bool = False, kind: str = "tmp") -> Path:
    """Create and return a fresh temporary file (or folder) beside ``target`` (same file system)."""
    target = Path(target)
    prefix = f".{target.name}.pid{os.getpid()}."
    suffix = f".peftmath-{kind}"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


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
