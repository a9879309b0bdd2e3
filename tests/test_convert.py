"""Conversion equals an independent reference built from SentencePiece ids; bad pairs are skipped, not fatal."""
import json

import numpy as np
import pytest
import sentencepiece as spm
from mindspore.mindrecord import FileReader

from mindrlhf.data.dataset import create_reward_dataset, resolve_mindrecord_files
from mindrlhf.errors import ConfigError

from conftest import EXAMPLES, TEST_JSONL, TOKENIZER, run_cli, run_killed, run_main

TEMPLATE = "根据以下问题，写一个合适的回答。\n\n### 问题：\n{instruction}\n\n### 回答：\n{response}"


def read_records(path):
    reader = FileReader(str(path), num_consumer=1)
    rows = list(reader.get_next())
    reader.close()
    return rows


def reference_sample(sp, row, seq, pad):
    """The tutorial's semantics written out independently, from raw SentencePiece ids."""
    prompt, chosen, rejected = row["prompt"].strip(), row["pos_resp"].strip(), row["neg_resp"].strip()
    c = sp.encode(TEMPLATE.format(instruction=prompt, response=chosen))[:seq]
    r = sp.encode(TEMPLATE.format(instruction=prompt, response=rejected))[:seq]
    c_pad = np.array(c + [pad] * (seq - len(c)))
    r_pad = np.array(r + [pad] * (seq - len(r)))
    diff = np.nonzero(c_pad != r_pad)[0]
    if len(diff) == 0:
        return None
    end = max(len(c), len(r))
    loss_mask = np.zeros(seq, dtype=np.int64)
    loss_mask[diff[0]:end] = 1
    return {"chosen_input_ids": c_pad, "rejected_input_ids": r_pad,
            "chosen_attention_mask": (np.arange(seq) < len(c)).astype(int),
            "rejected_attention_mask": (np.arange(seq) < len(r)).astype(int),
            "position_id": np.arange(seq), "loss_mask": loss_mask, "end_ind": end}


def test_conversion_matches_independent_reference(test_mindrecord):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    rows = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines() if line.strip()]
    expected = [s for s in (reference_sample(sp, r, 256, 2) for r in rows) if s is not None]
    got = read_records(test_mindrecord)
    assert len(got) == len(expected) == 773
    for want, have in zip(expected, got):
        for name, value in want.items():
            np.testing.assert_array_equal(np.asarray(have[name]), value, err_msg=name)
    stats = json.loads(test_mindrecord.with_name(test_mindrecord.name + ".stats.json").read_text())
    assert stats["rows"] == 773 and stats["stats"]["count"] == 773
    assert stats["max_token_id"] < 32000


def test_identical_after_truncation_is_skipped_and_counted(tmp_path):
    long_prompt = "请详细说明" * 200
    rows = [
        {"prompt": "怎么学习编程？", "pos_resp": "多写代码。", "neg_resp": "不用学。", "pos_type": "a", "neg_type": "b"},
        {"prompt": long_prompt, "pos_resp": "好的回答", "neg_resp": "坏的回答", "pos_type": "a", "neg_type": "b"},
        {"prompt": "相同", "pos_resp": "一样", "neg_resp": "一样", "pos_type": "a", "neg_type": "b"},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    dst = tmp_path / "out.mindrecord"
    # --model may also name the directory holding tokenizer.model
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER.parent, "--src_file", src,
                   "--dst_file", dst, "--seq_length", 64, "--pad_token_id", 2)
    assert "skipped: 2" in proc.stdout
    assert "identical after truncation (first lines: [2, 3])" in proc.stdout
    assert len(read_records(dst)) == 1
    stats = json.loads(proc.stdout.splitlines()[0])
    assert stats["count"] == 1 and {"prompt_max", "chosen_avg", "reject_min"} <= set(stats)


def test_existing_output_is_kept_without_overwrite(tmp_path, test_mindrecord):
    # in this process: the converter's success runs as a process in conftest, its exit 2 in test_bad_input
    dst = tmp_path / "keep.mindrecord"
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL,
             "--dst_file", dst, "--seq_length", 96, "--pad_token_id", 2)
    before = dst.read_bytes()
    proc = run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL,
                    "--dst_file", dst, "--seq_length", 128, "--pad_token_id", 2, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert dst.read_bytes() == before
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL,
             "--dst_file", dst, "--seq_length", 128, "--pad_token_id", 2, "--overwrite")
    assert len(read_records(dst)[0]["chosen_input_ids"]) == 128
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_a_kill_between_the_two_renames_leaves_a_pair_readers_refuse(tmp_path):
    """--overwrite killed after the new data file took its place and before its index did: the data file is the
    new write's, the index the earlier one's. Training and evaluation refuse the pair, naming the file (before:
    read as it was, the new rows through the old index)."""
    dst = tmp_path / "pairs.mindrecord"
    args = ("--model", TOKENIZER, "--src_file", TEST_JSONL, "--dst_file", dst, "--pad_token_id", 2)
    run_main(EXAMPLES / "cvalues_comparison.py", *args, "--seq_length", 96)
    earlier_index = (tmp_path / "pairs.mindrecord.db").read_bytes()
    run_killed(EXAMPLES / "cvalues_comparison.py", "replaced_together:renamed_first", *args, "--seq_length", 128,
               "--overwrite")
    assert (tmp_path / "pairs.mindrecord.db").read_bytes() == earlier_index  # the index comes last
    refusal = f"{dst}: its index {dst}.db comes from another write"
    with pytest.raises(ConfigError, match=refusal):
        resolve_mindrecord_files(str(tmp_path))
    with pytest.raises(ConfigError, match=refusal):
        create_reward_dataset(str(dst), batch_size=2)
    run_main(EXAMPLES / "cvalues_comparison.py", *args, "--seq_length", 128, "--overwrite")
    assert resolve_mindrecord_files(str(tmp_path)) == [str(dst)]
    assert len(read_records(dst)[0]["chosen_input_ids"]) == 128


@pytest.mark.parametrize("model", ["llama2_7b", "/nonexistent/tokenizer.model"])
def test_hub_names_fail_with_a_local_path_hint(tmp_path, model):
    dst = tmp_path / "x.mindrecord"
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", model, "--src_file", TEST_JSONL,
                   "--dst_file", dst, "--seq_length", 64, check=False)
    assert proc.returncode == 2
    assert "pass a local path" in proc.stderr and "Traceback" not in proc.stderr
    assert not dst.exists()
