"""mindrlhf.io's write-then-rename helpers: the one place outputs appear whole or not at all."""
import os

import pytest

from mindrlhf.config_access import config_getter
from mindrlhf.data.dataset import resolve_mindrecord_files
from mindrlhf.errors import ConfigError
from mindrlhf.io import replaced_folder, replaced_together, replaced_whole


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_replaced_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "export"
    with replaced_folder(str(out)) as tmp:
        open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8").close()
        assert not out.exists() and os.path.basename(tmp).startswith(".export.tmp-")
    assert sorted(os.listdir(out)) == ["a.txt"] and leftovers(out.parent) == []

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with replaced_folder(str(failed)) as tmp:
            open(os.path.join(tmp, "half"), "w", encoding="utf-8").close()
            raise RuntimeError("interrupted")
    assert not failed.exists() and leftovers(tmp_path) == []


def test_replaced_folder_never_replaces_a_folder_with_content(tmp_path):
    """Whether an existing output may go is the caller's rule: the helper itself never deletes it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OSError):
        with replaced_folder(str(out)) as tmp:
            open(os.path.join(tmp, "new"), "w", encoding="utf-8").close()
    assert (out / "mine.txt").read_text() == "keep" and sorted(os.listdir(out)) == ["mine.txt"]
    assert leftovers(tmp_path) == []


def test_replaced_together_stages_out_of_sight_of_dataset_discovery(tmp_path):
    """A MindRecord and its .db appear together; while they are written, a training run pointed at the folder
    does not pick the half-written file up (the staging folder is hidden)."""
    dst = str(tmp_path / "pairs.mindrecord")
    with replaced_together([dst, dst + ".db"]) as stage:
        for name in ("pairs.mindrecord", "pairs.mindrecord.db"):
            open(os.path.join(stage, name), "w", encoding="utf-8").close()
        with pytest.raises(ConfigError, match="holds no .mindrecord files"):
            resolve_mindrecord_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["pairs.mindrecord", "pairs.mindrecord.db"]

    other = str(tmp_path / "other.mindrecord")
    with pytest.raises(ValueError):
        with replaced_together([other, other + ".db"]) as stage:
            open(os.path.join(stage, "other.mindrecord"), "w", encoding="utf-8").close()
            raise ValueError("bad row")
    assert sorted(os.listdir(tmp_path)) == ["pairs.mindrecord", "pairs.mindrecord.db"]


def test_replaced_together_replaces_nothing_unless_every_file_is_staged(tmp_path):
    """A writer that staged the data file but not its index: the earlier pair stays as it was, both files."""
    dst = tmp_path / "pairs.mindrecord"
    for path in (dst, tmp_path / "pairs.mindrecord.db"):
        path.write_text("earlier")
    with pytest.raises(FileNotFoundError, match=f"{dst}.db was not written"):
        with replaced_together([str(dst), f"{dst}.db"]) as stage:
            open(os.path.join(stage, "pairs.mindrecord"), "w", encoding="utf-8").write("new")
    assert [p.read_text() for p in (dst, tmp_path / "pairs.mindrecord.db")] == ["earlier", "earlier"]
    assert leftovers(tmp_path) == []


def test_replaced_whole_removes_its_temporary_file(tmp_path):
    target = tmp_path / "x.ckpt"
    with pytest.raises(KeyError):
        with replaced_whole(str(target)) as tmp:
            open(tmp, "wb").close()
            raise KeyError("stop")
    assert list(tmp_path.iterdir()) == []


class Attrs:
    hidden_size = 8


def test_config_getter_reads_mappings_and_attributes():
    assert config_getter({"hidden_size": 8})("hidden_size") == 8
    assert config_getter({})("theta", 10000.0) == 10000.0
    assert config_getter(Attrs())("hidden_size") == 8 and config_getter(Attrs())("theta", 1.0) == 1.0
