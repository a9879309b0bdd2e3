"""A full disk for real: a size-limited tmpfs in a private mount namespace (`unshare -Urm`, no root needed where
user namespaces are allowed), filled to a known free space with a filler file. A checkpoint save, a MindRecord
conversion and a results file that hit ENOSPC fail with one clear error and leave the previous outputs whole."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, cli_env

TRAIN = EXAMPLES / "reward_train.py"
CONVERT = EXAMPLES / "cvalues_comparison.py"


def namespaces_work():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not namespaces_work(),
                                reason="needs `unshare -Urm` (user + mount namespaces) to mount a small tmpfs")

# Inside the namespace: a tmpfs on $DISK; $FILL_TO_HALF_OF (a file) fills it up to half that file's size free.
PRELUDE = """set -u
mount -t tmpfs -o size=96m tmpfs "$DISK"
fill_to_half_of() {
  size=$(du -B1 "$1" | cut -f1); avail=$(df --output=avail -B1 "$DISK" | tail -1)
  head -c $((avail - size / 2)) /dev/zero > "$DISK/filler" || true
}
"""


def in_small_disk(tmp_path, script, **env):
    """Run a shell script with a fresh 96 MB tmpfs at tmp_path/disk (visible only to it); returns the process."""
    disk = tmp_path / "disk"
    disk.mkdir()
    full_env = dict(cli_env(), DISK=str(disk), PY=sys.executable, **{k: str(v) for k, v in env.items()})
    return subprocess.run(["unshare", "-Urm", "bash", "-c", PRELUDE + script], env=full_env, capture_output=True,
                          text=True, timeout=1200)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keep_one_config(tmp_path_factory):
    """The tiny config at 1 layer, keeping one checkpoint: MindFormers removed the old one before writing."""
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["model"]["model_config"]["num_layers"] = 1
    for callback in raw["callbacks"]:
        if callback["type"] == "CheckpointMonitor":
            callback["keep_checkpoint_max"] = 1
    path = tmp_path_factory.mktemp("cfg") / "tiny_keep_one.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_full_disk_fails_the_save_and_keeps_the_last_checkpoint(keep_one_config, test_mindrecord, tmp_path):
    """keep_checkpoint_max 1, a checkpoint at step 2, then the disk has half a checkpoint free: the save of step 4
    fails with one error naming the folder, the space needed and free; step 2's file is whole and still listed."""
    script = """
train() { "$PY" "$TRAIN" --config "$CONFIG" --train_dataset "$DATA" --output_dir "$DISK/out" --batch_size 4 \
  --save_steps 2 "$@"; }
train --stop_step 2 > "$WORK/first.log" 2>&1 || { echo "first run failed"; cat "$WORK/first.log"; exit 1; }
ckpt=$(ls "$DISK"/out/checkpoint/rank_0/*.ckpt)
sha256sum "$ckpt" | cut -d' ' -f1 > "$WORK/before.sha"
fill_to_half_of "$ckpt"
train --stop_step 4 --resume > "$WORK/full.log" 2>&1; echo $? > "$WORK/rc"
rm -f "$DISK/filler"; cp -a "$DISK/out" "$WORK/out"
"""
    proc = in_small_disk(tmp_path, script, TRAIN=TRAIN, CONFIG=keep_one_config, DATA=test_mindrecord, WORK=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "full.log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", log[-3000:]
    folder = tmp_path / "disk" / "out" / "checkpoint" / "rank_0"
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder}: writing "), log[-3000:]
    assert "No space left on device" in errors[0] and "MB free there" in errors[0] and "MB are free" in errors[0]
    assert "Traceback" not in log
    files = sorted((tmp_path / "out" / "checkpoint" / "rank_0").iterdir())
    ckpts = [f for f in files if f.suffix == ".ckpt"]
    assert len(ckpts) == 1 and sha(ckpts[0]) == (tmp_path / "before.sha").read_text().strip()
    assert not [f for f in files if f.suffix == ".tmp"]
    meta = json.loads((tmp_path / "out" / "checkpoint" / "rank_0" / "meta.json").read_text())
    assert meta["last_ckpt_file"] == ckpts[0].name


def test_a_full_disk_fails_conversion_and_keeps_the_previous_output(tmp_path):
    """A conversion's overwrite that runs out of space leaves the previous .mindrecord/.db whole, nothing staged."""
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(TEST_JSONL.read_text(encoding="utf-8").splitlines(keepends=True)[:200]), encoding="utf-8")
    script = """
convert() { "$PY" "$CONVERT" --model "$TOKENIZER" --src_file "$SRC" --dst_file "$DISK/data.mindrecord" \
  --seq_length 256 --pad_token_id 2 "$@"; }
convert > "$WORK/first.log" 2>&1 || { cat "$WORK/first.log"; exit 1; }
sha256sum "$DISK"/data.mindrecord "$DISK"/data.mindrecord.db | cut -d' ' -f1 > "$WORK/before.sha"
fill_to_half_of "$DISK/data.mindrecord"
convert --overwrite > "$WORK/full.log" 2>&1; echo $? > "$WORK/rc"
sha256sum "$DISK"/data.mindrecord "$DISK"/data.mindrecord.db | cut -d' ' -f1 > "$WORK/after.sha"
ls -A "$DISK" > "$WORK/listing"
"""
    proc = in_small_disk(tmp_path, script, CONVERT=CONVERT, TOKENIZER=TOKENIZER, SRC=src, WORK=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "full.log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {tmp_path / 'disk'}: writing data.mindrecord"), log
    assert "MB are free" in errors[0] and "Traceback" not in log
    assert (tmp_path / "after.sha").read_text() == (tmp_path / "before.sha").read_text()
    assert sorted((tmp_path / "listing").read_text().split()) == ["data.mindrecord", "data.mindrecord.db",
                                                                 "data.mindrecord.stats.json", "filler"]


def test_a_full_disk_fails_a_results_file_and_keeps_the_previous_one(tmp_path):
    """The writers eval, infer and export share (mindrlhf.io): ENOSPC leaves the old file and no temporary."""
    code = ("import sys; from mindrlhf.io import write_jsonl; from mindrlhf.errors import OutputWriteError\n"
            "try:\n    write_jsonl(sys.argv[1], ({'i': i, 'text': 'x' * 1000} for i in range(20000)))\n"
            "except OutputWriteError as err:\n    print(err)\n")
    script = """
echo '{"old": true}' > "$DISK/scores.jsonl"
head -c $(( $(df --output=avail -B1 "$DISK" | tail -1) - 1000000 )) /dev/zero > "$DISK/filler"
"$PY" -c "$CODE" "$DISK/scores.jsonl" > "$WORK/out.txt" 2>&1
cat "$DISK/scores.jsonl" > "$WORK/after.jsonl"; ls -A "$DISK" > "$WORK/listing"
"""
    proc = in_small_disk(tmp_path, script, CODE=code, WORK=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = (tmp_path / "out.txt").read_text()
    assert message.startswith(f"{tmp_path / 'disk'}: writing scores.jsonl failed (No space left on device)"), message
    assert (tmp_path / "after.jsonl").read_text() == '{"old": true}\n'
    assert sorted((tmp_path / "listing").read_text().split()) == ["filler", "scores.jsonl"]
