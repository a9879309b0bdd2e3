"""Beyond one process, for real on CPU with msrun: data-parallel training on one node and on two "nodes",
resume on one node where one rank's newest checkpoint is truncated (all ranks fall back together; it resumes the
two-node run's checkpoints), and evaluation and inference split across ranks that give one process's results
exactly."""
import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest

import mindspore as ms

from mindrlhf.tools.loss_log import parse_log

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, msrun, run_main

pytestmark = pytest.mark.slow
TRAIN = EXAMPLES / "reward_train.py"
# Counters of the process that wrote the file (this run's own step count), not training state.
RUN_BOOKKEEPING = {"current_iterator_step", "last_overflow_iterator_step"}


def train_order(data, out, *extra):
    return " ".join(map(str, [TRAIN, "--config", TINY_CONFIG, "--train_dataset", data, "--output_dir", out,
                              "--use_parallel", "True", "--batch_size", 4, "--save_steps", 4, *extra]))


def newest(out, rank):
    files = sorted((out / "checkpoint" / f"rank_{rank}").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def tensors(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def step_of(path):
    return int(tensors(path)["global_step"].reshape(-1)[0])


def assert_same_state(a, b):
    wa, wb = tensors(a), tensors(b)
    assert set(wa) == set(wb) and any(k.startswith("adam_v.") for k in wa)
    for name in sorted(set(wa) - RUN_BOOKKEEPING):
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=f"{a.name} vs {b.name}: {name}")


@contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair, as two machines: msrun starts its scheduler on the node
    whose own address is master_addr, so two nodes on one host's loopback would both start one. Yields the
    `ip netns exec` prefixes of node 0 (10.213.7.1, the master) and node 1 (10.213.7.2)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("two msrun nodes on one machine need network namespaces (root and iproute2)")
    tag = f"mr{os.getpid() % 100000}"
    names = [f"{tag}n0", f"{tag}n1"]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", f"{tag}e0", "type", "veth", "peer", "name", f"{tag}e1")
        for n, name in enumerate(names):
            ip("link", "set", f"{tag}e{n}", "netns", name)
            ip("-n", name, "addr", "add", f"10.213.7.{n + 1}/30", "dev", f"{tag}e{n}")
            ip("-n", name, "link", "set", "lo", "up")
            ip("-n", name, "link", "set", f"{tag}e{n}", "up")
        yield [["ip", "netns", "exec", name] for name in names]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def two_node_run(test_mindrecord, tmp_path_factory):
    """Two msrun nodes (node_rank 0 and 1, one worker each, master 10.213.7.1) train 16 steps data-parallel."""
    work = tmp_path_factory.mktemp("two_nodes")
    out = work / "output"
    order = train_order(test_mindrecord, out, "--stop_step", 16)
    with two_hosts() as hosts:
        nodes = [msrun(order, 2, work / f"node{n}_log", 1, "10.213.7.1", 8118, n, prefix=hosts[n]) for n in (0, 1)]
        results = [node.communicate(timeout=900) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, (stdout[-2000:], stderr[-3000:])
    return {"out": out, "logs": work}


def test_two_nodes_train_data_parallel_to_identical_weights(two_node_run):
    out = two_node_run["out"]
    assert (two_node_run["logs"] / "node0_log" / "worker_0.log").exists()
    assert (two_node_run["logs"] / "node1_log" / "worker_1.log").exists()
    logs = [parse_log(out / "log" / f"rank_{r}" / "info.log") for r in (0, 1)]
    assert [len(points) for points in logs] == [16, 16]
    text = (out / "log" / "rank_0" / "info.log").read_text()
    assert set(re.findall(r"step:\[\s*\d+/\s*(\d+)\]", text)) == {str((773 + 1) // 2 // 4)}  # each rank: its half
    assert [p.loss for p in logs[0]][:3] != [p.loss for p in logs[1]][:3]  # different data, different losses
    a, b = newest(out, 0), newest(out, 1)
    assert step_of(a) == step_of(b) == 16
    wa, wb = tensors(a), tensors(b)
    params = [k for k in wa if k.startswith(("model.", "v_head."))]
    assert len(params) > 10
    for name in params:  # gradients were all-reduced: the replicas agree bit for bit
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.fixture(scope="module")
def sixteen_steps(test_mindrecord, tmp_path_factory, request):
    """The output folder of a finished 16-step data-parallel run of 2 ranks, a checkpoint every 4 steps: the
    two-node run where network namespaces allow it (no second launch), else the same order on one node."""
    try:
        return request.getfixturevalue("two_node_run")["out"]
    except pytest.skip.Exception:
        work = tmp_path_factory.mktemp("one_node")
        proc = msrun(train_order(test_mindrecord, work / "output", "--stop_step", 16), 2, work / "logs")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return work / "output"


def test_resume_under_msrun_falls_back_together_past_a_truncated_rank(sixteen_steps, test_mindrecord, tmp_path):
    """One node, 2 ranks, no root, resuming a finished 16-step 2-rank run's checkpoints (copied): rank 1's newest
    (step 16) is truncated, rank 0's reads back whole. agree_on_step sends both ranks back to step 12, the newest
    both can read, and the resumed run ends bit for bit where the uninterrupted one did."""
    out = tmp_path / "output"
    shutil.copytree(sixteen_steps / "checkpoint", out / "checkpoint")
    reference = {}
    for r in (0, 1):
        assert step_of(newest(out, r)) == 16
        reference[r] = shutil.copy2(newest(out, r), tmp_path / f"uninterrupted_rank_{r}.ckpt")
    bad = newest(out, 1)  # rank 1 was killed while writing step 16
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    proc = msrun(train_order(test_mindrecord, out, "--stop_step", 16, "--resume", "True", "--load_checkpoint",
                             out / "checkpoint"), 2, tmp_path / "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {r: (tmp_path / "resumed" / f"worker_{r}.log").read_text(encoding="utf-8") for r in (0, 1)}
    assert f"skipping corrupt or truncated checkpoint {bad}" in logs[1]
    assert "skipping corrupt" not in logs[0]
    for r in (0, 1):  # rank 0 could read step 16, yet went back to 12 with rank 1
        assert "not every rank can read step 16; all ranks resume from step 12" in logs[r]
        assert "Unsupported op [Barrier]" not in logs[r]
        assert len(re.findall(r"loss:\[", logs[r])) == 4, logs[r][-3000:]  # steps 13-16 only: resumed, not redone
        assert step_of(newest(out, r)) == 16
        assert_same_state(newest(out, r), reference[r])


def eval_pairs(path, n):
    path.write_text("\n".join(TEST_JSONL.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return path


def test_evaluation_split_across_ranks_equals_one_process(trained_run, tmp_path):
    pairs = eval_pairs(tmp_path / "pairs.jsonl", 200)
    common = ["--config", TINY_CONFIG, "--distributed_ckpt_path", trained_run["checkpoint_root"], "--eval_dataset",
              pairs, "--tokenizer", TOKENIZER, "--batch_size", 8]
    # the one process in this process (reward_eval.py's own run_cli runs are in test_training)
    run_main(EXAMPLES / "reward_eval.py", *common, "--output_file", tmp_path / "one.json",
             "--scores_file", tmp_path / "one.jsonl")
    order = " ".join(map(str, [EXAMPLES / "reward_eval.py", *common, "--output_file", tmp_path / "two.json",
                               "--scores_file", tmp_path / "two.jsonl"]))
    proc = msrun(order, 2, tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for result in (one, two):
        for item in result["checkpoints"]:
            item.pop("checkpoint")
    assert two["checkpoints"] == one["checkpoints"]  # accuracy, per-type results, margins: identical
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()  # per-pair scores
    batches = [(tmp_path / "logs" / f"worker_{r}.log").read_text(encoding="utf-8").count("avg acc: [")
               for r in (0, 1)]
    assert batches == [13, 12]  # 25 batches of 8 pairs, each rank about half


def test_inference_split_across_ranks_equals_one_process(trained_run, tmp_path):
    rows = eval_pairs(tmp_path / "rows.jsonl", 40)  # 80 responses, 5 batches of 16
    common = ["--config", TINY_CONFIG, "--data_file", rows, "--tokenizer", TOKENIZER, "--distributed_ckpt_path",
              trained_run["checkpoint_root"]]
    run_main(EXAMPLES / "reward_infer.py", *common, "--output_file", tmp_path / "one.jsonl")  # as above
    order = " ".join(map(str, [EXAMPLES / "reward_infer.py", *common, "--output_file", tmp_path / "two.jsonl"]))
    proc = msrun(order, 2, tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    scored = [(tmp_path / "logs" / f"worker_{r}.log").read_text(encoding="utf-8").count("reward score: [[")
              for r in (0, 1)]
    assert scored == [48, 32]  # batches 0, 2, 4 on rank 0; 1, 3 on rank 1


def test_sigterm_to_one_rank_stops_both_after_the_same_step_and_resumes_bit_exactly(sixteen_steps, test_mindrecord,
                                                                                  tmp_path, monkeypatch):
    """SIGTERM reaches rank 1 alone at the end of step 6 (the test hook): the step-end AllGather stops both ranks
    after step 6, each saves it, and the launcher exits 75; the same launch with --resume ends at step 16 bit for
    bit where the uninterrupted run did."""
    out = tmp_path / "output"
    monkeypatch.setenv("MINDRLHF_TEST_SIGNALS", "TERM@6/rank1")
    proc = msrun(train_order(test_mindrecord, out, "--stop_step", 16), 2, tmp_path / "stopped")
    assert proc.returncode == 75, proc.stderr[-3000:]
    logs = {r: (tmp_path / "stopped" / f"worker_{r}.log").read_text(encoding="utf-8") for r in (0, 1)}
    assert "stopped after step 6 (rank 1's request): checkpoint " in logs[0]
    assert "stopped after step 6 (SIGTERM): checkpoint " in logs[1]
    for r in (0, 1):
        assert step_of(newest(out, r)) == 6
        info = (out / "log" / f"rank_{r}" / "info.log").read_text(encoding="utf-8")
        print(f"rank {r}: " + re.search(r"stop check at \d+ step ends: median [\d.]+ ms", info).group(0))
    monkeypatch.delenv("MINDRLHF_TEST_SIGNALS")
    proc = msrun(train_order(test_mindrecord, out, "--stop_step", 16, "--resume"), 2, tmp_path / "resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert_same_state(newest(out, r), newest(sixteen_steps, r))
