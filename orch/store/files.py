"""The store's files on disk: database files only their owner can read.

The database holds every job's spec and environment (often secrets) in plain
text, so its folder is 0700 and its files 0600 whatever the umask: the umask
itself is left alone, since `orch up`'s workers, and so their jobs, inherit it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from orch.errors import StorageError

# The files of one SQLite database in WAL mode.
DB_SUFFIXES = ("", "-wal", "-shm")


def db_folder(db_path: Path) -> None:
    """The database's folder, made 0700 if it is missing (one that exists is left as it is: it may be shared)."""
    try:
        db_path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StorageError(f"cannot make the folder of the database {db_path}: a file is in the way") from None
    except OSError as e:
        raise StorageError(f"cannot make the folder of the database {db_path}: {e.strerror}") from None


def private_files(db_path: Path) -> None:
    """The database file made 0600 if missing; it, its -wal and its -shm narrowed to 0600 if wider.

    SQLite creates -wal and -shm with the database file's own mode, so a 0600
    database keeps them 0600 too.
    """
    try:
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"cannot create the database {db_path}: {e.strerror}") from None
    else:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
        finally:
            os.close(fd)
    for suffix in DB_SUFFIXES:
        path = Path(f"{db_path}{suffix}")
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StorageError(f"cannot use {path}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise StorageError(f"{path} is not a file (storage.path)")
        if stat.S_IMODE(mode) & 0o077:
            try:
                os.chmod(path, 0o600)
            except OSError as e:
                raise StorageError(f"cannot make {path} readable by its owner only (mode 0600): "
                                   f"{e.strerror}") from None
