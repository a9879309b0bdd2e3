"""Every bad-input kind: a message naming file, line and field, a non-zero exit, and no output left behind.

Each CLI and exit path runs once as a real subprocess (REAL_RUN, run_cli); the other kinds call the same main()
in this process (run_main): same argv, same messages, same exit code, without a MindSpore start-up each."""
import json

import pytest

from conftest import EXAMPLES, TOKENIZER, run_cli, run_main

GOOD = {"prompt": "问题", "pos_resp": "好的回答", "neg_resp": "坏的回答", "pos_type": "拒绝为主", "neg_type": "风险回复"}


def good_line(**change):
    row = dict(GOOD, **change)
    return json.dumps({k: v for k, v in row.items() if v is not KeyError}, ensure_ascii=False).encode("utf-8")


CASES = {
    "malformed_json": (b'{"prompt": "x", "pos_resp": ', "line 2", "malformed JSON"),
    "missing_field": (good_line(neg_resp=KeyError), "line 2", "field 'neg_resp': missing"),
    "non_string_field": (good_line(pos_resp=42), "line 2", "field 'pos_resp': must be a string"),
    "empty_prompt": (good_line(prompt="   "), "line 2", "field 'prompt': is empty"),
    "empty_response": (good_line(neg_resp=""), "line 2", "field 'neg_resp': is empty"),
    "not_utf8": (b'{"prompt": "\xff\xfe", "pos_resp": "a", "neg_resp": "b"}', "line 2", "not UTF-8"),
}


REAL_RUN = "malformed_json"  # the kind run as a real subprocess in each parametrized test


def runner(kind):
    return run_cli if kind == REAL_RUN else run_main


def write_source(tmp_path, bad_line):
    src = tmp_path / "src.jsonl"
    src.write_bytes(good_line() + b"\n" + bad_line + b"\n" + good_line(neg_resp="另一个回答") + b"\n")
    return src


@pytest.mark.parametrize("kind", sorted(CASES))
def test_conversion_rejects_bad_row(tmp_path, kind):
    bad, where, message = CASES[kind]
    src = write_source(tmp_path, bad)
    dst = tmp_path / "out" / "pairs.mindrecord"
    proc = runner(kind)(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src,
                        "--dst_file", dst, "--seq_length", 64, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert f"{src}:2" in err and message in err, err
    assert "Traceback" not in proc.stderr
    leftovers = list(dst.parent.glob("*")) if dst.parent.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("kind", sorted(CASES))
def test_skip_invalid_reports_and_writes_the_rest(tmp_path, kind):
    bad, _, message = CASES[kind]
    src = write_source(tmp_path, bad)
    dst = tmp_path / "pairs.mindrecord"
    proc = runner(kind)(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src,
                        "--dst_file", dst, "--seq_length", 64, "--skip_invalid")
    assert "skipped: 1" in proc.stdout and "[2]" in proc.stdout
    stats = json.loads(dst.with_name(dst.name + ".stats.json").read_text())
    assert stats["rows"] == 2
    reasons = stats["skipped"]["by_reason"]
    assert len(reasons) == 1 and message.split(": ")[-1] in next(iter(reasons))


def test_missing_source_file(tmp_path):
    dst = tmp_path / "pairs.mindrecord"
    proc = run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", tmp_path / "nope.jsonl",
                    "--dst_file", dst, "--seq_length", 64, check=False)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope.jsonl'}: file does not exist" in proc.stderr
    assert not dst.exists()


@pytest.mark.parametrize("script", ["reward_eval.py", "reward_infer.py"])
@pytest.mark.parametrize("kind", ["malformed_json", "missing_field", "not_utf8"])
def test_eval_and_infer_reject_bad_rows(tmp_path, script, kind):
    from conftest import TINY_CONFIG

    bad, _, message = CASES[kind]
    src = write_source(tmp_path, bad)
    out = tmp_path / "results" / "out.json"
    data_flag = "--eval_dataset" if script == "reward_eval.py" else "--data_file"
    extra = ["--tokenizer", TOKENIZER]
    proc = runner(kind)(EXAMPLES / script, "--config", TINY_CONFIG, data_flag, src, *extra,
                        "--distributed_ckpt_path", tmp_path / "no_checkpoint_needed_yet", "--output_file", out,
                        check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert f"{src}:2" in err and message in err, err
    assert not out.exists()


def test_existing_outputs_are_kept(tmp_path):
    from conftest import TINY_CONFIG, TEST_JSONL

    existing = tmp_path / "results.json"
    existing.write_text("keep me")
    for script, flag in (("reward_eval.py", "--eval_dataset"), ("reward_infer.py", "--data_file")):
        proc = run_main(EXAMPLES / script, "--config", TINY_CONFIG, flag, TEST_JSONL, "--tokenizer", TOKENIZER,
                        "--distributed_ckpt_path", tmp_path, "--output_file", existing, check=False)
        assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr[-1000:]
    assert existing.read_text() == "keep me"

    plots = tmp_path / "loss_dir"
    plots.mkdir()
    (plots / "loss.png").write_bytes(b"old")
    log = tmp_path / "info.log"
    log.write_text("epoch: 1 step: 1, loss: 0.5\n")
    proc = run_cli(EXAMPLES / "reward_loss_plot.py", "--log_file", log, "--output_file_dir", plots, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (plots / "loss.png").read_bytes() == b"old"
    run_cli(EXAMPLES / "reward_loss_plot.py", "--log_file", log, "--output_file_dir", plots, "--overwrite")
    assert (plots / "loss.png").read_bytes()[:4] == b"\x89PNG"

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint" / "rank_0").mkdir(parents=True)
    earlier = run_dir / "checkpoint" / "rank_0" / "earlier-1_10.ckpt"
    earlier.write_bytes(b"an earlier run")
    proc = run_main(EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset", tmp_path / "x",
                    "--output_dir", run_dir, check=False)
    assert proc.returncode == 2 and "earlier run" in proc.stderr and "--resume" in proc.stderr
    assert earlier.read_bytes() == b"an earlier run"
