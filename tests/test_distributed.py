"""Rank tables and the rank-table launcher's bookkeeping (multi-rank training, resume, evaluation: test_multirank.py)."""
import json
import os
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


RANK_SCRIPT = """import os, pathlib, sys, threading, time
rank = int(os.environ["RANK_ID"])
here = pathlib.Path(sys.argv[1])
(here / f"up_{rank}").write_text(str(os.getpid()))
mode = sys.argv[2]
def wait_for(*paths):  # an event another process makes (a file), looked at every 50 ms
    while not all(p.exists() for p in paths):
        time.sleep(0.05)
if mode == "fail" and rank == 2:  # fails once every other rank is up: they are surely running then
    wait_for(*(here / f"up_{r}" for r in range(4) if r != 2))
    sys.exit(7)
if mode == "fail":
    threading.Event().wait()  # never ends by itself: only the launcher stopping it ends it
wait_for(here / "release")  # detach: runs on after the launcher returned, until the test releases it
(here / f"done_{rank}").write_text("")
"""


def rank_order(tmp_path, mode):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    return f"{sys.executable} {script} {tmp_path} {mode}"


def wait_for(*paths, guard=120):
    """Until the files exist; `guard` only turns a hang into a failure."""
    deadline = time.monotonic() + guard
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.05)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launcher_stops_the_others_and_names_the_failed_rank(tmp_path, table):
    """Ranks 0, 1 and 3 never end on their own; rank 2 fails once they are all up. The launcher must stop them
    and return (a launcher that waited for them would hit the hang guard, never reached otherwise)."""
    proc = launch(tmp_path, rank_order(tmp_path, "fail"), table, "[0,4)", 4, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "a rank failed: stopping the other 3 rank(s)" in proc.stderr
    log = tmp_path / "output" / "log" / "rank_2" / "mindformer.log"
    assert f"rank 2 (exit 7, log {log.relative_to(tmp_path)})" in proc.stderr.replace(str(tmp_path) + "/", "")
    assert "rank 0 (" not in proc.stderr.split("FAILED")[1]  # stopped, not failed
    pids = [int((tmp_path / f"up_{r}").read_text()) for r in (0, 1, 3)]
    assert not [pid for pid in pids if alive(pid)]  # stopped, not left running


def test_launcher_detach_returns_at_once(tmp_path, table):
    """--detach returns while the ranks run on (they wait for a file the test writes only after it returned);
    without --detach the launcher would wait for them and hit the hang guard."""
    try:
        proc = launch(tmp_path, rank_order(tmp_path, "detach"), table, "[0,2)", 2, detach=True, timeout=120)
        assert proc.returncode == 0 and "detached" in proc.stdout, proc.stderr
        wait_for(tmp_path / "up_0", tmp_path / "up_1")
        assert not list(tmp_path.glob("done_*"))  # still running after the launcher returned
    finally:
        (tmp_path / "release").write_text("")  # never leave the ranks waiting
    wait_for(tmp_path / "done_0", tmp_path / "done_1")


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
