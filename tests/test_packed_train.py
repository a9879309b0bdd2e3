"""Packed (padding-free, issue #25) training end to end through the tutorial's CLIs and the packed tiny YAML: one
epoch learns, resume continues bit for bit, and msrun data parallel on CPU gives each rank the same number of steps
over disjoint pairs."""
import json
import re
from collections import Counter

import numpy as np
import pytest
import yaml

import mindspore as ms

from mindrlhf.tools.loss_log import parse_log

from conftest import CONFIGS, EXAMPLES, SEEN_PAIRS, TEST_JSONL, TINY_CONFIG, TOKENIZER, msrun, run_cli, run_main

pytestmark = pytest.mark.slow
TRAIN = EXAMPLES / "reward_train.py"
PACKED_CONFIG = CONFIGS / "run_llama_2_tiny_packed_rm_cpu.yaml"
# Counters of the process that wrote the file (this run's own step count), not training state.
RUN_BOOKKEEPING = {"current_iterator_step", "last_overflow_iterator_step"}
PACKING_LINE = re.compile(r"\[mindrlhf\] packing pairs \(span\): (\d+) pairs -> (\d+) steps of 8 pairs a rank x "
                          r"(\d+) rank\(s\), rows of 512 tokens, \[1, 2, 4, 8\] rows a step")
TEST_PAIRS = 773


def train(data, out, *extra, config=PACKED_CONFIG):
    return run_cli(TRAIN, "--config", config, "--train_dataset", data, "--output_dir", out, *extra)


def tensors(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def newest(out, rank=0):
    files = sorted((out / "checkpoint" / f"rank_{rank}").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def step_of(path):
    return int(tensors(path)["global_step"].reshape(-1)[0])


def test_the_packed_yaml_is_the_tiny_yaml_with_packing():
    """Only the packing keys differ from the tiny YAML, so the padded tiny YAML reads its checkpoints; a step
    has the padded step's 2 x 8 rows x 256 tokens."""
    packed = yaml.safe_load(PACKED_CONFIG.read_text(encoding="utf-8"))
    tiny = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    model, tiny_model = packed["model"]["model_config"], tiny["model"]["model_config"]
    assert (model.pop("packing"), model.pop("loss_type"), model.pop("seq_length")) == ("pairs", "span", 512)
    tiny_model.pop("seq_length")
    assert model == tiny_model
    data, tiny_data = packed.pop("train_dataset"), tiny.pop("train_dataset")
    assert (data.pop("pack_rows"), data.pop("bucket_boundaries"), tiny_data.pop("bucket_boundaries")) == (8, [], "auto")
    assert data == tiny_data
    assert 8 * 512 == 2 * tiny["runner_config"]["batch_size"] * 256
    assert packed["train_dataset_task"]["dataset_config"] is data  # the YAML anchor: the task reads this section
    for raw in (packed, tiny):
        raw.pop("model"), raw.pop("train_dataset_task")
    assert packed == tiny


@pytest.fixture(scope="module")
def packed_epoch(trained_run, tmp_path_factory):
    """One epoch of the packed tiny YAML over the same pairs as conftest's padded trained_run (the data it
    converted), via the CLI."""
    out = tmp_path_factory.mktemp("packed") / "output"
    proc = train(trained_run["data"], out, "--save_steps", 100)
    return {"proc": proc, "output": out, "summary": json.loads((out / "train_summary.json").read_text()),
            "log": out / "log" / "rank_0" / "info.log"}


def accuracy(checkpoint_root, out):
    """reward_eval.py with the padded tiny YAML on the shared test split: the newest checkpoint's accuracy."""
    run_cli(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path", checkpoint_root,
            "--eval_dataset", TEST_JSONL, "--tokenizer", TOKENIZER, "--output_file", out)
    results = json.loads(out.read_text())
    assert results["pairs"] == TEST_PAIRS
    return results["checkpoints"][0]["accuracy"]


def test_one_packed_epoch_learns(packed_epoch, trained_eval, tmp_path):
    (line,) = PACKING_LINE.findall(packed_epoch["proc"].stdout)
    pairs, steps, ranks = int(line[0]), int(line[1]), int(line[2])
    assert pairs == SEEN_PAIRS and ranks == 1 and steps == SEEN_PAIRS // 8  # the padded run's steps of 8 pairs
    points = parse_log(packed_epoch["log"])
    assert [p.step for p in points] == list(range(1, steps + 1))  # one epoch: every planned step, once
    assert all(np.isfinite(p.loss) for p in points)
    losses = np.array([p.loss for p in points])
    assert losses[:5].mean() > 0.6 and losses[-100:].mean() < 0.25 * losses[:5].mean()
    summary = packed_epoch["summary"]
    assert summary["pairs"] == SEEN_PAIRS and summary["steps_logged"] == steps and summary["loss_type"] == "span"
    assert summary["checkpoints"] and summary["checkpoints"][-1].endswith(f"_{steps}.ckpt")
    assert summary["packing"] == {"mode": "pairs", "pairs": pairs, "steps": steps, "pack_rows": 8, "seq_length": 512,
                                  "pack_steps": "batch_size", "row_counts": [1, 2, 4, 8]}
    packed = accuracy(packed_epoch["output"] / "checkpoint", tmp_path / "packed.json")
    padded = trained_eval["results"]["checkpoints"][0]["accuracy"]  # the padded run's, same split and YAML
    assert trained_eval["results"]["pairs"] == TEST_PAIRS
    assert packed >= 0.95 and abs(packed - padded) <= 0.02, (packed, padded)


def test_the_packed_run_logs_the_padded_runs_losses(packed_epoch, trained_run):
    """The same pairs a step in the same order, each weighing 1/batch_size: the packed CLI run logs the losses of
    conftest's padded trained_run (the tiny YAML: no buckets at seq 256, the same seed), equal to the log's 6
    digits while AdamW has not yet amplified float32 rounding (the first 50 steps), and close over the epoch."""
    padded = np.array([p.loss for p in parse_log(trained_run["log"])])
    packed = np.array([p.loss for p in parse_log(packed_epoch["log"])])
    assert len(packed) == len(padded) == SEEN_PAIRS // 8
    diff = np.abs(packed - padded)
    print(f"\nPACKED-VS-PADDED losses: largest difference {diff[:50].max():.1e} over steps 1-50, "
          f"{diff[:100].max():.1e} over 1-100, {diff.max():.1e} over the epoch ({len(diff)} steps)")
    assert diff[:50].max() <= 1e-5, np.flatnonzero(diff[:50] > 1e-5) + 1
    assert diff.max() <= 2e-2, int(np.argmax(diff)) + 1


def test_packed_resume_is_bit_exact(test_mindrecord, tmp_path):
    """Stopped at step 8 and resumed to 16 = 16 steps straight: every tensor, optimizer state included, bit for
    bit (the packed plan and its shuffled step order are the seed's, so the resumed run skips to the same step)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(test_mindrecord, straight, "--stop_step", 16, "--save_steps", 8)
    train(test_mindrecord, resumed, "--stop_step", 8, "--save_steps", 8)
    proc = train(test_mindrecord, resumed, "--stop_step", 16, "--save_steps", 8, "--resume", "True",
                 "--load_checkpoint", resumed / "checkpoint")
    assert PACKING_LINE.search(proc.stdout)
    a, b = newest(straight), newest(resumed)
    assert step_of(a) == step_of(b) == 16
    wa, wb = tensors(a), tensors(b)
    assert set(wa) == set(wb) and any(k.startswith("adam_m.") for k in wa)
    assert len([k for k in wa if k.startswith(("model.", "v_head."))]) > 10
    for name in sorted(set(wa) - RUN_BOOKKEEPING):
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    # the resumed run logged steps 9-16 only, with the uninterrupted run's losses
    assert [(p.step, p.loss) for p in parse_log(resumed / "log" / "rank_0" / "info.log")][-8:] == \
        [(p.step, p.loss) for p in parse_log(straight / "log" / "rank_0" / "info.log")][8:16]


def seen_pairs(steps):
    """The (chosen, rejected) token tuples a sequence of packed steps carries (pairs mode: a pair is segments
    2k-1 and 2k of its row; in-span pads, kind +4, left out)."""
    from mindrlhf.data import packing as pk

    found = Counter()
    for ids, codes in steps:
        for row_ids, row_codes in zip(ids, codes):
            segment, pad = pk.segment_of(row_codes), (pk.kind_of(row_codes) & pk.PAD) != 0
            for first in range(1, int(segment.max()) + 1, 2):
                chosen = row_ids[(segment == first) & ~pad]
                rejected = row_ids[(segment == first + 1) & ~pad]
                found[(tuple(chosen.tolist()), tuple(rejected.tolist()))] += 1
    return found


MSRUN_PAIRS = 240  # about 15 packed steps a rank (the whole split's 773: about 48): enough for the checks below


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    """The first MSRUN_PAIRS test pairs converted at seq 256, pad 2 (in this process: the converter's own
    subprocess runs are conftest's)."""
    work = tmp_path_factory.mktemp("few_pairs")
    src = work / "pairs.jsonl"
    src.write_text("".join(TEST_JSONL.read_text(encoding="utf-8").splitlines(keepends=True)[:MSRUN_PAIRS]),
                   encoding="utf-8")
    out = work / "test_256.mindrecord"
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src, "--dst_file", out,
             "--seq_length", 256, "--pad_token_id", 2)
    return out


def test_packed_data_parallel_under_msrun(few_pairs, tmp_path):
    """2 ranks, one epoch of MSRUN_PAIRS test pairs: both ranks run the same number of steps and end (no hang
    waiting for the other), losses finite and different per rank, replicas equal; the ranks' shards are disjoint
    and together hold every pair once."""
    from mindrlhf.data.dataset import create_reward_dataset, read_pairs

    data = few_pairs
    out = tmp_path / "output"
    order = " ".join(map(str, [TRAIN, "--config", PACKED_CONFIG, "--train_dataset", data, "--output_dir",
                               out, "--use_parallel", "True", "--save_steps", 1000]))
    proc = msrun(order, 2, tmp_path / "logs", timeout=900)  # a hang becomes a failure
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = PACKING_LINE.findall((tmp_path / "logs" / "worker_0.log").read_text(encoding="utf-8"))
    pairs, per_rank, ranks = int(line[0]), int(line[1]), int(line[2])
    assert pairs == MSRUN_PAIRS and ranks == 2 and per_rank == MSRUN_PAIRS // 16  # 8 pairs a rank a step
    logs = [parse_log(out / "log" / f"rank_{r}" / "info.log") for r in (0, 1)]
    assert [[p.step for p in points] for points in logs] == [list(range(1, per_rank + 1))] * 2
    assert all(np.isfinite(p.loss) for points in logs for p in points)
    assert [p.loss for p in logs[0]][:3] != [p.loss for p in logs[1]][:3]  # different pairs, different losses
    a, b = newest(out, 0), newest(out, 1)
    assert step_of(a) == step_of(b) == per_rank
    wa, wb = tensors(a), tensors(b)
    for name in [k for k in wa if k.startswith(("model.", "v_head."))]:  # gradients all-reduced: same replicas
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    # Each rank's shard as its RewardModelDataset builds it (same files, seed and packing settings the trainer
    # copies from the YAML; shard_id/num_shards as under msrun): disjoint, and together every pair exactly once.
    seed = yaml.safe_load(PACKED_CONFIG.read_text(encoding="utf-8"))["seed"]  # MindFormers copies it to the dataset
    shards = []
    for rank in (0, 1):
        dataset = create_reward_dataset(str(data), batch_size=8, shuffle=True, shard_id=rank,
                                        num_shards=2, seed=seed, pad_token_id=2, packing="pairs", pack_rows=8,
                                        loss_type="span", seq_length=512)
        rows = [(row["input_ids"], row["attention_mask"])
                for row in dataset.create_dict_iterator(num_epochs=1, output_numpy=True)]
        assert len(rows) == per_rank
        shards.append(seen_pairs(rows))
    everything = Counter((tuple(p.chosen.tolist()), tuple(p.rejected.tolist()))
                         for p in read_pairs([str(data)], 2)[0])
    assert sum(everything.values()) == MSRUN_PAIRS
    assert [sum(s.values()) for s in shards] == [8 * per_rank] * 2  # batch_size pairs a rank a step
    both = shards[0] + shards[1]
    assert max(both.values()) == 1 and not set(both) - set(everything)  # disjoint: each pair at most once
