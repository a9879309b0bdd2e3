"""HCCL rank-table tool (MindFormers 1.9 no longer ships hccl_tools.py): v1.0 JSON for one server, and merge.

    python -m mindrlhf.tools.hccl_tools --device_num "[0,8)"
    python -m mindrlhf.tools.hccl_tools merge hccl_8p_node0.json hccl_8p_node1.json -o hccl_16p.json
Device IPs come from --device_ips, `hccn_tool`, or /etc/hccn.conf; with none of them it refuses, since a
table without real device IPs cannot work.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from mindrlhf.io import write_json

RANGE = re.compile(r"^\s*\[\s*(\d+)\s*,\s*(\d+)\s*[\])]\s*$")
HCCN_CONF = "/etc/hccn.conf"


class RankTableError(Exception):
    pass


def parse_device_range(text: str) -> List[int]:
    """'[0,8)' or the tutorial's '[0,8]' -> [0..7]: start inclusive, end exclusive (as the upstream tool)."""
    match = RANGE.match(text or "")
    if not match:
        raise RankTableError(f"--device_num must look like \"[0,8)\", got {text!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if not 0 <= start < end <= 16:
        raise RankTableError(f"device range {text!r} must satisfy 0 <= start < end <= 16")
    return list(range(start, end))


def ips_from_hccn_conf(path: str = HCCN_CONF) -> Dict[int, str]:
    ips = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                match = re.match(r"\s*address_(\d+)\s*=\s*([\d.]+)", line)
                if match:
                    ips[int(match.group(1))] = match.group(2)
    return ips


def ips_from_hccn_tool(devices: Sequence[int]) -> Dict[int, str]:
    tool = shutil.which("hccn_tool")
    if not tool:
        return {}
    ips = {}
    for device in devices:
        out = subprocess.run([tool, "-i", str(device), "-ip", "-g"], capture_output=True, text=True, check=False)
        match = re.search(r"ipaddr:\s*([\d.]+)", out.stdout)
        if match:
            ips[device] = match.group(1)
    return ips


def device_ips(devices: Sequence[int], explicit: Optional[str] = None, conf: str = HCCN_CONF) -> Dict[int, str]:
    if explicit:
        given = [ip.strip() for ip in explicit.split(",") if ip.strip()]
        if len(given) != len(devices):
            raise RankTableError(f"--device_ips lists {len(given)} address(es) for {len(devices)} device(s)")
        return dict(zip(devices, given))
    ips = ips_from_hccn_tool(devices)
    if len(ips) < len(devices):
        ips = {**ips_from_hccn_conf(conf), **ips}
    missing = [d for d in devices if d not in ips]
    if missing:
        raise RankTableError(f"no device IP for device(s) {missing}: hccn_tool is not available and {conf} has no "
                             "address_N entry for them. On an Ascend server run `hccn_tool -i N -ip -g`; "
                             "elsewhere pass --device_ips ip0,ip1,...")
    return {d: ips[d] for d in devices}


def host_ip() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def build_table(devices: Sequence[int], ips: Dict[int, str], server_ip: str, first_rank: int = 0) -> dict:
    return {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": server_ip,
            "device": [{"device_id": str(d), "device_ip": ips[d], "rank_id": str(first_rank + i)}
                       for i, d in enumerate(devices)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }


def validate_table(table: dict) -> None:
    """The v1.0 schema: string values everywhere, consecutive rank ids from 0, distinct device ids per server."""
    if table.get("version") != "1.0" or table.get("status") != "completed":
        raise RankTableError("version must be '1.0' and status 'completed'")
    servers = table.get("server_list")
    if not isinstance(servers, list) or table.get("server_count") != str(len(servers)):
        raise RankTableError("server_count must be the number of servers, as a string")
    ranks = []
    for server in servers:
        if not isinstance(server.get("server_id"), str) or server.get("host_nic_ip") != "reserve":
            raise RankTableError("each server needs a string server_id and host_nic_ip 'reserve'")
        seen = set()
        for device in server.get("device", []):
            if set(device) != {"device_id", "device_ip", "rank_id"} or \
                    not all(isinstance(v, str) for v in device.values()):
                raise RankTableError(f"device entry {device} must hold string device_id, device_ip, rank_id")
            if device["device_id"] in seen:
                raise RankTableError(f"device {device['device_id']} listed twice on {server['server_id']}")
            seen.add(device["device_id"])
            ranks.append(int(device["rank_id"]))
    if ranks != list(range(len(ranks))) or not ranks:
        raise RankTableError(f"rank ids must be 0..{len(ranks) - 1} in order, got {ranks}")


def merge_tables(tables: Sequence[dict]) -> dict:
    servers, rank = [], 0
    for table in tables:
        validate_table(table)
        for server in table["server_list"]:
            devices = []
            for device in server["device"]:
                devices.append(dict(device, rank_id=str(rank)))
                rank += 1
            servers.append(dict(server, device=devices))
    ids = [server["server_id"] for server in servers]
    if len(set(ids)) != len(ids):
        raise RankTableError(f"the tables share a server_id ({ids}); merge one table per node")
    merged = {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}
    validate_table(merged)
    return merged


def table_name(devices: Sequence[int], server_ip: str) -> str:
    return f"hccl_{len(devices)}p_{''.join(str(d) for d in devices)}_{server_ip}.json"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "merge":
            parser = argparse.ArgumentParser(prog="hccl_tools.py merge", description="merge per-node rank tables")
            parser.add_argument("tables", nargs="+")
            parser.add_argument("-o", "--output", required=True)
            args = parser.parse_args(argv[1:])
            tables = []
            for path in args.tables:
                with open(path, encoding="utf-8") as fh:
                    tables.append(json.load(fh))
            print(write_json(args.output, merge_tables(tables), indent=4))
            return 0
        parser = argparse.ArgumentParser(prog="hccl_tools.py", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--device_num", default="[0,8)", help='device range, e.g. "[0,8)" or "[4,8)"')
        parser.add_argument("--visible_devices", default=None,
                            help="comma-separated physical ids (default: ASCEND_VISIBLE_DEVICES or 0..7)")
        parser.add_argument("--server_ip", default=None, help="this server's IP (default: detected)")
        parser.add_argument("--device_ips", default=None, help="comma-separated device IPs, one per device")
        parser.add_argument("--hccn_conf", default=HCCN_CONF, help="hccn.conf to read device IPs from")
        parser.add_argument("--output_dir", default=".", help="where to write the table")
        args = parser.parse_args(argv)
        indices = parse_device_range(args.device_num)
        visible = args.visible_devices or os.environ.get("ASCEND_VISIBLE_DEVICES") or "0,1,2,3,4,5,6,7"
        physical = [int(v) for v in visible.split(",") if v.strip()]
        if indices[-1] >= len(physical):
            raise RankTableError(f"range {args.device_num} exceeds the {len(physical)} visible device(s)")
        devices = [physical[i] for i in indices]
        server_ip = args.server_ip or host_ip()
        table = build_table(devices, device_ips(devices, args.device_ips, args.hccn_conf), server_ip)
        validate_table(table)
        os.makedirs(args.output_dir, exist_ok=True)
        print(write_json(os.path.join(args.output_dir, table_name(devices, server_ip)), table, indent=4))
        return 0
    except (RankTableError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
