"""Writing results safely: never over an existing output unless asked, and never half a file."""
import errno
import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from typing import Sequence

from mindrlhf.errors import OutputExistsError, OutputWriteError


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


@contextmanager
def replaced_folder(path: str):
    """Yield a new empty folder beside `path` and rename it onto `path` when the block succeeds, so a reader
    sees the whole folder or none of it; on an error the temporary folder and all it holds are removed.

    An empty folder at `path` is replaced; anything else there makes the rename fail. Whether an existing output
    may go is the caller's rule (export: only an earlier export, with --overwrite), so the caller removes it at the
    end of the block."""
    with _staging_folder(path) as tmp:
        yield tmp
        os.replace(tmp, os.path.abspath(path))


@contextmanager
def replaced_together(paths: Sequence[str]):
    """Files that must appear together (a MindRecord and its .db): yield a hidden staging folder beside the
    first path, in which the block writes each file under its own base name; when the block succeeds each is
    renamed onto its path and the folder removed, on an error the folder and all it holds are removed."""
    with _staging_folder(paths[0]) as tmp:
        yield tmp
        for path in paths:
            os.replace(os.path.join(tmp, os.path.basename(path)), path)
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
