"""Reward server throughput: dynamic batching vs one text per forward pass (`--max_batch 1`), same server code,
same texts, same run.

32 concurrent clients (threads, one keep-alive HTTP connection each, 127.0.0.1 only) each send one text per
request to POST /score, back to back, for --requests_per_client requests. Both servers compile every shape at
start (--warmup), run side by side and get the same warm-up round; the timed rounds alternate between them
(--rounds each), so a change in machine load hits both. The same texts scored in-process without HTTP give the
ceiling batching can reach on this machine. Reports requests/s and p50/p99 latency for both, the ratio, and
checks both answered the same scores (benchmarks/results/server.json). Target: >= 5x requests/s at a lower p99.

Then OpenRLHF's bursts (`--openrlhf_rollouts`, default 64, 256 and 512): a server with every default (max_in_flight,
max_batch, request_timeout) and a client that behaves as OpenRLHF 0.11's SingleTurnAgentExecutor: each rollout
sends its samples one query per request (`{"query": [decoded text], "prompts", "labels"}`, the text decoded by
transformers with skip_special_tokens=False, so `<s> ...</s>`), ignores Retry-After, retries any error 5 times 1 s
apart with a 180 s timeout, then drops the sample; it reads `scores`, else `rewards`. Reports samples scored and
dropped, tries, 503s and p50/p99 latency (first try to answer), and checks every score against the plain text's
(benchmarks/results/server_openrlhf.json).

Then (`--memory_requests`, default 8 and 24; 0 skips) the memory bound: a service built in this process with the
tiny model at the 7B YAML's seq_length 4096 (random weights) and the default limits, served by uvicorn on a thread;
N requests each carrying a body of max_body_bytes (max_texts texts of text that tokenizes to more than 4096 tokens
each, the most token ids a body can leave) are held in flight (the batcher's before_pass holds a first small
request's pass until the N are queued), and the process's RSS is read then, and its peak while they were parsed and
encoded. The slope over N is what one request in flight costs; docs/serving.md gives the bound
(benchmarks/results/server_memory.json). The held requests are then answered with a 500 (no 4096-token passes).
Without --distributed_ckpt_path the tiny config's randomly initialised weights are served.
"""
import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import ROOT, TEST_JSONL, TINY_CONFIG, TOKENIZER, require_inputs, save

SERVER = ROOT / "examples" / "reward_model_train_tutorial" / "reward_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_checkpoint(config: str, directory: Path) -> str:
    import mindspore as ms

    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.evaluation.scorer import RewardScorer

    ms.set_seed(0)
    path = directory / "random" / "rank_0" / "random.ckpt"
    path.parent.mkdir(parents=True)
    ms.save_checkpoint(RewardScorer(config).network, str(path))
    return str(path.parent.parent)


def model_ceiling(config: str, ckpt: str, items: list, clients: int) -> dict:
    """The same texts scored in-process, no HTTP: one per forward pass vs rounds of `clients` batched as the
    server batches them (DynamicBatcher.score). Bounds what the server can gain from batching on this machine."""
    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.run import run_template
    from mindrlhf.evaluation.scorer import RewardScorer, list_checkpoints
    from mindrlhf.serving.batcher import DynamicBatcher

    tok = load_tokenizer(str(TOKENIZER))
    template = run_template(ckpt, None, tok)
    scorer = RewardScorer(config, list_checkpoints(ckpt)[-1], batch_size=clients)
    ids = [x[:scorer.seq_length] for x in tok.encode([template.render(i["prompt"], i["response"]) for i in items],
                                                     special_tokens=template.special_tokens)]
    one, many = DynamicBatcher(scorer, 1), DynamicBatcher(scorer, clients)
    one.warmup()
    many.warmup()
    single = batched = 0.0
    for _ in range(3):  # alternating, as the server rounds
        began = time.perf_counter()
        for seq in ids:
            one.score([seq])
        single += time.perf_counter() - began
        began = time.perf_counter()
        for start in range(0, len(ids), clients):
            many.score(ids[start:start + clients])
        batched += time.perf_counter() - began
    return {"batch_1_seq_per_s": round(3 * len(ids) / single, 1),
            "batched_seq_per_s": round(3 * len(ids) / batched, 1), "ratio": round(single / batched, 2)}


def post(conn, body: dict):
    data = json.dumps(body).encode("utf-8")
    conn.request("POST", "/score", body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {answer}")
    return answer


class Server:
    """reward_server.py as a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, config, ckpt, max_batch, log_path):
        self.port = free_port()
        self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, str(SERVER), "--config", config, "--distributed_ckpt_path", ckpt, "--tokenizer",
             str(TOKENIZER), "--port", str(self.port), "--warmup", "--log_level", "warning",
             *(["--max_batch", str(max_batch)] if max_batch else [])],  # None: the default
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited with {self.proc.returncode}; see {log_path}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        sys.exit(f"server did not start within 300 s; see {log_path}")

    def counts(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())["counts"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.log.close()
        if code != 0:
            sys.exit(f"server exited with {code} on SIGTERM")


def load(port: int, items: list, clients: int, per_client: int):
    """clients threads, each sending per_client requests of one item; (wall seconds, latencies, scores)."""
    latencies, scores, errors = [], {}, []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)

    def client(index: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start_gate.wait()
        try:
            for k in range(per_client):
                item = (index * per_client + k) % len(items)
                sent = time.perf_counter()
                answer = post(conn, items[item])
                took = time.perf_counter() - sent
                with lock:
                    latencies.append(took)
                    scores[item] = answer["rewards"][0]
        except Exception as err:  # pylint: disable=broad-except  (reported below)
            errors.append(repr(err))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        sys.exit(f"{len(errors)} client(s) failed, e.g. {errors[0]}")
    return wall, np.array(latencies), scores


def decoded_queries(items: list) -> list:
    """The rendered texts as OpenRLHF sends them: the ids (with BOS and EOS) decoded by transformers' Llama
    tokenizer with skip_special_tokens=False."""
    from transformers import LlamaTokenizerFast

    from mindrlhf.data.prompt import format_prompt

    hf = LlamaTokenizerFast(vocab_file=str(TOKENIZER), legacy=True)
    texts = [format_prompt(i["prompt"], i["response"]) for i in items]
    ids = hf(texts, add_special_tokens=False)["input_ids"]
    return [hf.decode([hf.bos_token_id] + x + [hf.eos_token_id], skip_special_tokens=False) for x in ids]


def openrlhf_burst(port: int, queries: list, rollouts: int, per_rollout: int) -> dict:
    """`rollouts` concurrent rollouts, each sending per_rollout samples one after the other with OpenRLHF's
    request handling (aiohttp, 180 s, 5 tries 1 s apart, Retry-After ignored, then the sample is dropped)."""
    import aiohttp

    latencies, tries, statuses, scores, dropped = [], [], {}, {}, []

    timeout = aiohttp.ClientTimeout(total=180)

    async def sample(index):
        query = queries[index % len(queries)]
        payload = {"query": [query], "prompts": [""], "labels": [None]}
        began = time.perf_counter()
        for attempt in range(1, 6):
            try:  # a new session (and connection) per try, as OpenRLHF's _post_request
                async with aiohttp.ClientSession(timeout=timeout) as session, \
                        session.post(f"http://127.0.0.1:{port}/get_reward", json=payload) as response:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    response.raise_for_status()
                    info = await response.json()
                    scores[index % len(queries)] = (info.get("scores") or info.get("rewards"))[0]
                    latencies.append(time.perf_counter() - began)
                    tries.append(attempt)
                    return
            except Exception:  # pylint: disable=broad-except  (OpenRLHF logs and retries any error)
                pass
            await asyncio.sleep(1)
        dropped.append(index)

    async def rollout(r):
        for k in range(per_rollout):
            await sample(r * per_rollout + k)

    async def run_all():
        began = time.perf_counter()
        await asyncio.gather(*(rollout(r) for r in range(rollouts)))
        return time.perf_counter() - began

    wall = asyncio.run(run_all())
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"rollouts": rollouts, "samples": rollouts * per_rollout, "scored": len(latencies),
            "dropped": len(dropped), "retried": int(sum(t > 1 for t in tries)), "max_tries": max(tries or [0]),
            "http_statuses": {str(k): v for k, v in sorted(statuses.items())}, "wall_s": round(wall, 2),
            "samples_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1), "scores": scores}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY_CONFIG))
    parser.add_argument("--distributed_ckpt_path", default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests_per_client", type=int, default=8)
    parser.add_argument("--max_batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per mode")
    parser.add_argument("--openrlhf_rollouts", type=int, nargs="*", default=[64, 256, 512],
                        help="concurrent OpenRLHF-like rollouts against a server with default limits")
    parser.add_argument("--samples_per_rollout", type=int, default=8)
    parser.add_argument("--skip_batching", action="store_true", help="only the OpenRLHF bursts and the memory bound")
    parser.add_argument("--memory_requests", type=int, nargs="*", default=[8, 24],
                        help="requests of max_body_bytes held in flight for the memory bound (none: skip it)")
    args = parser.parse_args()
    require_inputs()
    work = Path(tempfile.mkdtemp(prefix="bench_server_"))
    ckpt = args.distributed_ckpt_path or random_checkpoint(args.config, work)
    pairs = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()]
    items = [{"prompt": p["prompt"], "response": p[key]} for p in pairs for key in ("pos_resp", "neg_resp")]
    items = items[:args.clients * args.requests_per_client]
    checkpoint = "random weights" if not args.distributed_ckpt_path else ckpt
    if not args.skip_batching:
        save("server", batching(args, ckpt, items, work))
    if args.memory_requests:
        save("server_memory", memory_bound(args.config, args.memory_requests, work))
    if args.openrlhf_rollouts:
        save("server_openrlhf", {"checkpoint": checkpoint, "defaults": "every server limit",
                                 "samples_per_rollout": args.samples_per_rollout,
                                 "bursts": openrlhf_bursts(args, ckpt, items, work)})


def openrlhf_bursts(args, ckpt: str, items: list, work: Path) -> list:
    """A server with every default limit, OpenRLHF-like rollouts against it; each score checked against the
    plain text's (the server normalises the decoded query)."""
    queries = decoded_queries(items)
    server = Server(args.config, ckpt, None, work / "openrlhf.log")
    out = []
    try:
        plain = {}
        for i, item in enumerate(items):  # reference: the plain (prompt, response), one request each
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            plain[i] = post(conn, item)["rewards"][0]
            conn.close()
        for rollouts in args.openrlhf_rollouts:
            burst = openrlhf_burst(server.port, queries, rollouts, args.samples_per_rollout)
            scores = burst.pop("scores")
            burst["max_abs_difference_to_plain"] = max(abs(scores[i] - plain[i]) for i in scores) if scores else None
            print("openrlhf-like:", burst, flush=True)
            out.append(burst)
    finally:
        server.stop()
    for burst in out:
        assert burst["dropped"] == 0, f"{burst['dropped']} samples dropped at {burst['rollouts']} rollouts"
        assert burst["max_abs_difference_to_plain"] < 1e-4, burst
    return out


def batching(args, ckpt: str, items: list, work: Path) -> dict:
    """Dynamic batching vs one text per forward pass (the first part of this benchmark)."""
    ceiling = model_ceiling(args.config, ckpt, items, args.clients)

    print("model only (no HTTP):", ceiling, flush=True)
    results, scores = {}, {}
    modes = {"batch_1": 1, "dynamic": args.max_batch}
    servers = {}
    try:
        for name, max_batch in modes.items():  # both up at once: the rounds alternate, so load drift hits both
            servers[name] = Server(args.config, ckpt, max_batch, work / f"{name}.log")
            load(servers[name].port, items, args.clients, 1)  # warm-up: connections, first requests
        walls, lats, before = {n: 0.0 for n in modes}, {n: [] for n in modes}, {}
        for name in modes:
            before[name] = servers[name].counts()
        for _ in range(args.rounds):
            for name in modes:
                wall, lat, scores[name] = load(servers[name].port, items, args.clients, args.requests_per_client)
                walls[name] += wall
                lats[name].extend(lat)
        for name, max_batch in modes.items():
            after, lat = servers[name].counts(), np.array(lats[name])
            passes = after["forward_passes"] - before[name]["forward_passes"]
            results[name] = {"max_batch": max_batch, "requests": len(lat), "wall_s": round(walls[name], 3),
                             "requests_per_s": round(len(lat) / walls[name], 1),
                             "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
                             "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
                             "forward_passes": passes,
                             "mean_rows_per_pass": round((after["sequences"] - before[name]["sequences"])
                                                         / max(1, passes), 1)}
            print(name, results[name], flush=True)
    finally:
        for server in servers.values():
            server.stop()
    common = sorted(set(scores["batch_1"]) & set(scores["dynamic"]))
    diff = max(abs(scores["batch_1"][i] - scores["dynamic"][i]) for i in common)
    speedup = results["dynamic"]["requests_per_s"] / results["batch_1"]["requests_per_s"]
    result = {"clients": args.clients, "requests_per_client": args.requests_per_client, "texts": len(items),
              "cpu_count": os.cpu_count(), "checkpoint": "random weights" if not args.distributed_ckpt_path else ckpt,
              **results, "model_only_ceiling": ceiling, "speedup": round(speedup, 2),
              "p99_ratio": round(results["dynamic"]["p99_ms"] / results["batch_1"]["p99_ms"], 2),
              "max_abs_score_difference": diff, "target": ">= 5x requests/s at a lower p99"}
    print(f"dynamic batching: {speedup:.2f}x requests/s, p99 {results['dynamic']['p99_ms']} ms vs "
          f"{results['batch_1']['p99_ms']} ms; max |score difference| {diff:.2e}")
    assert diff < 1e-4, diff
    return result


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def reset_peak():
    """Start VmHWM (peak RSS) again from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
        fh.write("5")


def largest_body(limits) -> bytes:
    """A /get_reward body of at most max_body_bytes: max_texts texts (or fewer, if the body limit is reached first)
    of random lowercase words, each of more than 4096 tokens for the Llama 2 tokenizer (about 0.57 tokens a
    character), so that what a request keeps after encoding, its ids cut to seq_length, is as large as it gets."""
    rng = np.random.default_rng(0)
    per_text = min(limits.max_chars, (limits.max_body_bytes - 64) // limits.max_texts - 4)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", np.uint8)
    texts = [rng.choice(letters, per_text).tobytes().decode("ascii") for _ in range(limits.max_texts)]
    body = json.dumps({"query": texts}).encode("utf-8")
    assert len(body) <= limits.max_body_bytes, len(body)
    return body


def memory_bound(config: str, counts: list, work: Path) -> dict:
    """RSS with N requests of max_body_bytes in flight, for each N in counts (see the module docstring)."""
    import uvicorn

    from mindrlhf.serving.app import ENCODE_THREADS, Limits, create_app
    from mindrlhf.serving.server import build_service, open_socket

    long_config = work / "tiny_4096.yaml"
    long_config.write_text(Path(config).read_text(encoding="utf-8").replace("    seq_length: 256\n",
                                                                           "    seq_length: 4096\n", 1),
                           encoding="utf-8")
    ckpt = random_checkpoint(str(long_config), work / "memory")
    limits = Limits()
    service = build_service(str(long_config), ckpt, str(TOKENIZER), limits, max_batch=4)
    assert service.scorer.seq_length == 4096
    sock = open_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    body = largest_body(limits)
    tokens = [len(x) for x in service.tokenizer.encode(json.loads(body)["query"][:2])]
    assert min(tokens) > 4096, tokens
    batcher, results = service.batcher, []
    plug_ids = service.encode(["memory plug"])[0]

    def send(data: bytes, out: list):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/get_reward", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out.append(resp.status)
        resp.read()
        conn.close()

    try:
        for count in counts:
            entered, release, done = threading.Event(), threading.Event(), []

            def before_pass(rows):
                if any(np.array_equal(row, plug_ids) for row in rows):
                    entered.set()
                    release.wait(600)
                else:
                    raise RuntimeError("memory benchmark: not scored")

            batcher.before_pass = before_pass
            plug = threading.Thread(target=send, args=(json.dumps({"query": ["memory plug"]}).encode(), done))
            plug.start()
            entered.wait(120)
            base = rss_kib()
            reset_peak()
            threads = [threading.Thread(target=send, args=(body, done)) for _ in range(count)]
            for thread in threads:
                thread.start()
            while batcher.jobs.qsize() < count:
                time.sleep(0.05)
            held, peak = rss_kib(), rss_kib("VmHWM")
            release.set()
            for thread in threads + [plug]:
                thread.join(600)
            assert sorted(done) == [200] + [500] * count, done
            results.append({"requests": count, "rss_before_mib": round(base / 1024, 1),
                            "rss_held_mib": round(held / 1024, 1), "peak_mib": round(peak / 1024, 1),
                            "held_per_request_mib": round((held - base) / 1024 / count, 2)})
            print("memory:", results[-1], flush=True)
    finally:
        batcher.before_pass = None
        server.should_exit = True
        batcher.stop()
    per_request = max(r["held_per_request_mib"] for r in results)
    ids_mib = limits.max_texts * 4096 * 4 / 2 ** 20
    return {"seq_length": 4096, "limits": vars(limits), "body_bytes": len(body),
            "tokens_per_text": tokens, "runs": results, "held_per_request_mib": per_request,
            "ids_per_request_mib": ids_mib, "encode_threads": ENCODE_THREADS,
            "bound_at_max_in_flight_mib": round(limits.max_in_flight * max(limits.max_body_bytes / 2 ** 20, ids_mib)),
            "projected_at_max_in_flight_mib": round(results[0]["rss_before_mib"] + limits.max_in_flight * per_request)}


if __name__ == "__main__":
    sys.exit(main())
