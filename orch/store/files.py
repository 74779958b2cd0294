"""The store's files on disk: a private data dir, database files only their owner can read, one scheduler each.

The database holds every job's spec and environment (often secrets) in plain
text, so its folder is 0700 and its files 0600 whatever the umask: the umask
itself is left alone, since `orch up`'s workers, and so their jobs, inherit it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from orch.core.errors import StorageError

# The files of one SQLite database in WAL mode.
DB_SUFFIXES = ("", "-wal", "-shm")


def private_dir(path: Path) -> Path:
    """Make the data dir 0700, or make an existing one so."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise StorageError(f"the data dir {path} is not a folder (storage.data_dir, --data-dir)") from None
    except OSError as e:
        raise StorageError(f"cannot make the data dir {path}: {e.strerror}") from None
    try:
        st = path.stat()
    except OSError as e:
        raise StorageError(f"cannot use the data dir {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"the data dir {path} is not a folder (storage.data_dir, --data-dir)")
    if st.st_mode & stat.S_ISVTX and st.st_mode & stat.S_IWOTH:
        # Like /tmp: others may create files in it, and it must not be made 0700 for them.
        raise StorageError(f"the data dir {path} is a folder shared with every user (mode "
                           f"{stat.S_IMODE(st.st_mode):o}): give orch a folder of its own")
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise StorageError(f"cannot make the data dir {path} private (mode 0700): {e.strerror}") from None
    return path


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


class DatabaseLock:
    """An exclusive flock on ``<database>.lock``, which holds the holder's pid: one scheduler per database.

    The kernel lets the lock go when the process ends, however it ends (kill -9
    too); the file itself stays (removing it would let two processes lock two
    different files of the same name).
    """

    def __init__(self, db_path: Path, data_dir: Path | None = None) -> None:
        self.db_path = Path(db_path)
        self.data_dir = data_dir
        self.path = Path(f"{db_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        db_folder(self.db_path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _pid_in(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"cannot lock {self.path}: {e.strerror}") from None
            where = f"the database {self.db_path}" + (f" (data dir {self.data_dir})" if self.data_dir else "")
            raise StorageError(f"another scheduler, pid {holder or '(unknown)'}, is using {where}: stop it "
                               "first, or give this one a data dir of its own (--data-dir)") from None
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                os.fchmod(fd, 0o600)
            pid = f"{os.getpid()}\n".encode()
            # Written over the old pid, then cut: a reader sees one whole pid on the first line, never none.
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as e:
            os.close(fd)
            raise StorageError(f"cannot write the lock file {self.path}: {e.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pid_in(fd: int) -> int | None:
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
        return int(first) if first.strip().isdigit() else None
    except OSError:
        return None
