"""Every bad-input kind: a message naming file, line and field, a non-zero exit, and no output left behind."""
import json

import pytest

from conftest import EXAMPLES, TOKENIZER, run_cli

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


def write_source(tmp_path, bad_line):
    src = tmp_path / "src.jsonl"
    src.write_bytes(good_line() + b"\n" + bad_line + b"\n" + good_line(neg_resp="另一个回答") + b"\n")
    return src


@pytest.mark.parametrize("kind", sorted(CASES))
def test_conversion_rejects_bad_row(tmp_path, kind):
    bad, where, message = CASES[kind]
    src = write_source(tmp_path, bad)
    dst = tmp_path / "out" / "pairs.mindrecord"
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src,
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
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src,
                   "--dst_file", dst, "--seq_length", 64, "--skip_invalid")
    assert "skipped: 1" in proc.stdout and "[2]" in proc.stdout
    stats = json.loads(dst.with_name(dst.name + ".stats.json").read_text())
    assert stats["rows"] == 2
    reasons = stats["skipped"]["by_reason"]
    assert len(reasons) == 1 and message.split(": ")[-1] in next(iter(reasons))


def test_missing_source_file(tmp_path):
    dst = tmp_path / "pairs.mindrecord"
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", tmp_path / "nope.jsonl",
                   "--dst_file", dst, "--seq_length", 64, check=False)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope.jsonl'}: file does not exist" in proc.stderr
    assert not dst.exists()
