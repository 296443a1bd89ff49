"""Write a directory so that readers see the old one or the whole new one, never half."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(dest: Path) -> None:
    """Remove what an earlier write of `dest` left when it was killed: its temporary and old
    directories, named with the writer's pid, whose writer is gone."""
    for d in dest.parent.glob(f".{dest.name}.*"):
        pid = d.name[len(dest.name) + 2:].split(".")[-2 if d.name.endswith(".tmp") else -1]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it replaces `dest`, on any
    error it is removed and `dest` is left as it was. A killed writer cannot clean up: the
    next write of the same `dest` does (clean_stale)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.tmp", dir=dest.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
