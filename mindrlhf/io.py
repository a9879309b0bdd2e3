"""Writing results safely: never over an existing output unless asked, and never half a file."""
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

from mindrlhf.errors import OutputExistsError, OutputWriteError

KILL_AT = "MINDRLHF_TEST_KILL_AT"
NO_EXCHANGE = "MINDRLHF_TEST_NO_EXCHANGE"  # test hook: take the aside-then-move path, as on a file system without exchange
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def kill_point(name: str):
    """Test hook, inert unless the environment variable KILL_AT names this point: then the process is killed here
    with SIGKILL (nothing cleans up), so a test can see what a reader finds after a kill at that very moment."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_new_output(path: str, overwrite: bool = False, flag: str = "--overwrite") -> str:
    """Refuse an existing output path unless overwrite; returns the path."""
    if path and os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass {flag} to replace it or choose another path")
    return path


DISK_FAULTS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def is_disk_fault(err: BaseException) -> bool:
    """A write failed for the disk's sake (full, quota, I/O error), not for a bug; also MindRecord's C++ writer,
    which reports it as a RuntimeError naming the condition."""
    if isinstance(err, OSError):
        return err.errno in DISK_FAULTS
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(sign in text for sign in ("no space left", "no free disk",
                                                                           "input/output error"))


def disk_fault_error(err: BaseException, path: str, needed: int = 0) -> OutputWriteError:
    """One clear error for a failed write: the folder, its free space, and what the output needed."""
    folder = os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else os.path.abspath(path)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MB are free"
    except OSError:
        free = "its free space is unknown"
    need = f"it needs about {needed / 2**20:.1f} MB free there, " if needed else ""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:  # MindSpore's C++ errors put the message on an "[ERROR] ..." line among banners
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line[len("[ERROR]"):].strip() for line in lines if line.startswith("[ERROR]")), lines[0])
    return OutputWriteError(f"{folder}: writing {os.path.basename(path)} failed ({reason}); {need}{free}; "
                            "nothing partial was left")


def temporary_name(path: str, suffix: str = "", hidden: bool = False) -> str:
    """A name beside `path` no other writer picks: host, pid and a random token, since processes on two hosts
    sharing a folder over NFS can have the same pid. `hidden` starts it with a dot, so that folder walks that
    skip hidden folders (dataset discovery) never see a half-written output."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{'.' if hidden else ''}{name}.tmp-{socket.gethostname()}-{os.getpid()}-"
                                f"{secrets.token_hex(4)}{suffix}")


@contextmanager
def replaced_whole(path: str, suffix: str = ""):
    """Yield a temporary name beside `path` (its folder created) and rename it onto `path` when the block
    succeeds, so a reader never sees half a file; on an error the temporary file is removed. `suffix` keeps
    the extension for writers that choose the format by name (matplotlib)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_disk_fault(err):
            raise disk_fault_error(err, path) from err
        raise
    os.replace(tmp, path)


@contextmanager
def _staging_folder(path: str):
    """A new hidden folder beside `path` (its parent created), removed with all it holds when the block fails."""
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = temporary_name(target, hidden=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_fault(err):
            raise disk_fault_error(err, target) from err
        raise


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE), so no moment has neither at
    either name. False where the C library or the file system lacks it; the paths are then untouched."""
    if os.environ.get(NO_EXCHANGE):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


@contextmanager
def replaced_folder(path: str, replace: bool = False):
    """Yield a new empty folder beside `path` and rename it onto `path` when the block succeeds, so a reader
    sees the whole folder or none of it; on an error the temporary folder and all it holds are removed.

    Without `replace` an empty folder at `path` is replaced and anything else there makes the rename fail. With
    `replace` the caller has checked that what is at `path` may go (export: only an earlier export, with
    --overwrite): the two folders are exchanged in one step and the old one, now under the hidden name, deleted,
    so a kill at any moment leaves the old folder or the new one at `path`. Where the file system cannot exchange,
    the old folder is moved aside under a hidden name first (a kill between the two renames leaves it whole there)."""
    target = os.path.abspath(path)
    with _staging_folder(path) as tmp:
        yield tmp
        if not (replace and os.path.isdir(target)):
            os.replace(tmp, target)
            return
        if exchange(tmp, target):
            kill_point("replaced_folder:exchanged")
            shutil.rmtree(tmp)
            return
        aside = temporary_name(target, ".old", hidden=True)
        os.rename(target, aside)
        kill_point("replaced_folder:aside")
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        kill_point("replaced_folder:moved_in")
        shutil.rmtree(aside)


@contextmanager
def replaced_together(paths: Sequence[str], check: Optional[Callable[[List[str]], None]] = None):
    """Files that must appear together (a MindRecord and its .db): yield a hidden staging folder beside the
    first path, in which the block writes each file under its own base name. When the block succeeds, every
    staged file must be there and pass `check` (given the staged paths) before the first rename; then each is
    renamed onto its path in the order given, so list last the file that makes the set readable (the index).
    On an error the folder and all it holds are removed and nothing is replaced."""
    with _staging_folder(paths[0]) as tmp:
        yield tmp
        staged = [os.path.join(tmp, os.path.basename(path)) for path in paths]
        missing = [path for path, name in zip(paths, staged) if not os.path.isfile(name)]
        if missing:
            raise FileNotFoundError(f"{missing[0]} was not written: none of {list(paths)} is replaced")
        if check is not None:
            check(staged)
        for i, (path, name) in enumerate(zip(paths, staged)):
            if i:
                kill_point("replaced_together:renamed_first")
            os.replace(name, path)
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj, indent: int = 2) -> str:
    """Write whole or not at all (replaced_whole)."""
    with replaced_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
    return path


def write_jsonl(path: str, rows) -> str:
    """One JSON object a line, written whole or not at all (replaced_whole)."""
    with replaced_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
