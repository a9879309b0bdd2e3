"""Rank tables and the rank-table launcher's bookkeeping (multi-rank training, resume, evaluation: test_multirank.py)."""
import json
import subprocess
import sys
import time

import pytest

from mindrlhf.tools.hccl_tools import RankTableError, validate_table

from conftest import SCRIPTS, cli_env

HCCL = SCRIPTS / "hccl_tools.py"
LAUNCH = SCRIPTS / "run_distribute_reward.sh"


def hccl(*args, cwd):
    return subprocess.run([sys.executable, str(HCCL), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=cli_env(), timeout=60)


@pytest.mark.parametrize("rng, devices", [("[0,8)", list(range(8))), ("[0,4)", [0, 1, 2, 3]),
                                          ("[4,8)", [4, 5, 6, 7]), ("[0,8]", list(range(8)))])
def test_rank_table_schema(tmp_path, rng, devices):
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{d}=192.98.{d % 4}.{10 + d}\nnetmask_{d}=255.255.255.0\n" for d in range(8)))
    proc = hccl("--device_num", rng, "--server_ip", "10.1.2.3", "--hccn_conf", conf, "--output_dir", tmp_path,
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"hccl_{len(devices)}p_{''.join(map(str, devices))}_10.1.2.3.json"
    assert proc.stdout.strip() == str(path)
    table = json.loads(path.read_text())
    validate_table(table)
    assert set(table) == {"version", "server_count", "server_list", "status"}
    (server,) = table["server_list"]
    assert server["server_id"] == "10.1.2.3" and server["host_nic_ip"] == "reserve"
    assert [d["device_id"] for d in server["device"]] == [str(d) for d in devices]
    assert [d["rank_id"] for d in server["device"]] == [str(i) for i in range(len(devices))]
    assert [d["device_ip"] for d in server["device"]] == [f"192.98.{d % 4}.{10 + d}" for d in devices]


def test_rank_table_needs_real_device_ips(tmp_path):
    proc = hccl("--device_num", "[0,8)", "--hccn_conf", tmp_path / "none.conf", "--output_dir", tmp_path,
                cwd=tmp_path)
    assert proc.returncode == 2 and "no device IP" in proc.stderr and "--device_ips" in proc.stderr
    assert not list(tmp_path.glob("*.json"))
    proc = hccl("--device_num", "[0,2)", "--device_ips", "1.1.1.1", cwd=tmp_path)
    assert proc.returncode == 2 and "1 address(es) for 2 device(s)" in proc.stderr
    proc = hccl("--device_num", "0-8", cwd=tmp_path)
    assert proc.returncode == 2 and "must look like" in proc.stderr


def test_merge_renumbers_ranks_across_nodes(tmp_path):
    for node in (1, 2):
        ips = ",".join(f"10.{node}.0.{d}" for d in range(4))
        assert hccl("--device_num", "[0,4)", "--device_ips", ips, "--server_ip", f"10.0.0.{node}",
                    "--output_dir", tmp_path / f"n{node}", cwd=tmp_path).returncode == 0
    out = tmp_path / "hccl_8p.json"
    parts = [next((tmp_path / f"n{n}").glob("*.json")) for n in (1, 2)]
    assert hccl("merge", *parts, "-o", out, cwd=tmp_path).returncode == 0
    table = json.loads(out.read_text())
    validate_table(table)
    assert table["server_count"] == "2"
    assert [d["rank_id"] for s in table["server_list"] for d in s["device"]] == [str(i) for i in range(8)]
    same = hccl("merge", parts[0], parts[0], "-o", tmp_path / "bad.json", cwd=tmp_path)
    assert same.returncode == 2 and "share a server_id" in same.stderr
    with pytest.raises(RankTableError):
        validate_table(dict(table, server_count=2))


def launch(tmp_path, order, table, rng, size, *, detach=False, timeout=120):
    args = ["bash", str(LAUNCH)] + (["--detach"] if detach else []) + [order, str(table), rng, str(size)]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=dict(cli_env(), OUTPUT_DIR=str(tmp_path / "output")))


@pytest.fixture()
def table(tmp_path):
    path = tmp_path / "hccl.json"
    ips = ",".join(f"10.0.0.{d}" for d in range(8))
    assert hccl("--device_num", "[0,8)", "--device_ips", ips, "--server_ip", "127.0.0.1", cwd=tmp_path).returncode == 0
    next(tmp_path.glob("hccl_8p_*.json")).rename(path)
    return path


PRINT_ENV = (f'{sys.executable} -c "import os; print(*[os.environ[k] for k in '
             '(\'RANK_TABLE_FILE\', \'DEVICE_ID\', \'RANK_ID\', \'RANK_SIZE\')])"')


def test_launcher_sets_rank_environment_and_logs(tmp_path, table):
    proc = launch(tmp_path, PRINT_ENV, table, "[4,8]", 4)
    assert proc.returncode == 0, proc.stderr
    for rank in range(4):
        log = tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log"
        assert log.read_text().split() == [str(table), str(4 + rank), str(rank), "4"]


def test_launcher_tells_ranks_how_many_share_this_host(tmp_path, table):
    """Ranks 4-7 of an 8-rank job on this host: kernel threads divide the cores by 4 (the ranks here), not 8."""
    order = (f'{sys.executable} -c "import os; from mindrlhf import distributed; '
             'print(os.environ[\'LOCAL_RANK_SIZE\'], distributed.local_rank_count(), distributed.rank_and_size()[1])"')
    proc = subprocess.run(["bash", str(LAUNCH), order, str(table), "[0,4)", "8"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(cli_env(), OUTPUT_DIR=str(tmp_path / "output"),
                                                           RANK_START="4"))
    assert proc.returncode == 0, proc.stderr
    for rank in range(4, 8):
        log = tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log"
        assert log.read_text().split() == ["4", "4", "8"]


def test_launcher_stops_the_others_and_names_the_failed_rank(tmp_path, table):
    order = (f'{sys.executable} -c "import os, sys, time; r = int(os.environ[\'RANK_ID\']); '
             'print(\'rank\', r, flush=True); time.sleep(1 if r == 2 else 120); sys.exit(7 if r == 2 else 0)"')
    start = time.time()
    proc = launch(tmp_path, order, table, "[0,4)", 4)
    assert time.time() - start < 30  # the sleeping ranks were stopped, not waited for
    assert proc.returncode == 1
    log = tmp_path / "output" / "log" / "rank_2" / "mindformer.log"
    assert f"rank 2 (exit 7, log {log.relative_to(tmp_path)})" in proc.stderr.replace(str(tmp_path) + "/", "")
    assert "rank 0 (" not in proc.stderr.split("FAILED")[1]


def test_launcher_detach_returns_at_once(tmp_path, table):
    proc = launch(tmp_path, "sleep 2", table, "[0,2)", 2, detach=True, timeout=10)
    assert proc.returncode == 0 and "detached" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["python x.py", "missing.json", "[0,8]", "8"], "does not exist"),
    (["python x.py", "TABLE", "0-8", "8"], "DEVICE_RANGE must look like"),
    (["python x.py", "TABLE", "[0,8]", "4"], "RANK_SIZE 4 is smaller"),
    (["python x.py", "TABLE", "[0,8]"], "expected 4 arguments"),
])
def test_launcher_validates_arguments(tmp_path, table, args, message):
    args = [str(table) if a == "TABLE" else a for a in args]
    proc = subprocess.run(["bash", str(LAUNCH), *args], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and "Usage" not in proc.stdout
    assert "EXECUTE_ORDER" in proc.stderr  # the usage text
