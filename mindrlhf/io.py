"""Writing results safely: never over an existing output unless asked, and never half a file."""
import json
import os

from mindrlhf.errors import OutputExistsError


def check_new_output(path: str, overwrite: bool = False, flag: str = "--overwrite") -> str:
    """Refuse an existing output path unless overwrite; returns the path."""
    if path and os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass {flag} to replace it or choose another path")
    return path


def write_json(path: str, obj) -> str:
    """Write via a temporary name and rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
    return path


def write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
