"""Writing results safely: never over an existing output unless asked, and never half a file."""
import json
import os
import secrets
import socket
from contextlib import contextmanager

from mindrlhf.errors import OutputExistsError


def check_new_output(path: str, overwrite: bool = False, flag: str = "--overwrite") -> str:
    """Refuse an existing output path unless overwrite; returns the path."""
    if path and os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass {flag} to replace it or choose another path")
    return path


def temporary_name(path: str, suffix: str = "") -> str:
    """A name beside `path` no other writer picks: host, pid and a random token, since processes on two hosts
    sharing a folder over NFS can have the same pid."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


@contextmanager
def replaced_whole(path: str, suffix: str = ""):
    """Yield a temporary name beside `path` (its folder created) and rename it onto `path` when the block
    succeeds, so a reader never sees half a file; on an error the temporary file is removed. `suffix` keeps
    the extension for writers that choose the format by name (matplotlib)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


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
