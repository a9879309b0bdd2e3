"""The reward server, the Hugging Face export and reward normalisation, for real (issues #13 and #16).

A copy of the session's trained tiny checkpoint is served by reward_server.py processes on free loopback ports and
spoken to over real HTTP (http.client, raw sockets, threads); scores are compared with reward_infer.py run as a
subprocess on the same rows. Only 127.0.0.1 is ever used.
"""
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import mindspore  # noqa: F401  (before transformers: MindSpore's generated protobuf code needs to load first)
import numpy as np
import pytest

from conftest import EXAMPLES, SCRIPTS, TEST_JSONL, TINY_CONFIG, TOKENIZER, cli_env, free_port, run_cli, run_main

pytestmark = pytest.mark.slow  # needs the trained_run fixture
SERVER = EXAMPLES / "reward_server.py"
KEY = "test-key-3f9c1a7e5d"  # passed through the environment, never on a command line
PAD = 2


# -- helpers -------------------------------------------------------------------------------------------------
class Http:  # pylint: disable=too-few-public-methods
    """Requests to a server on 127.0.0.1:self.port over real HTTP (http.client)."""

    port: int

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else None, dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path, timeout=5)

    def post(self, path, obj, key=None, raw=None, timeout=60):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = raw if raw is not None else json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return self.request("POST", path, body, headers, timeout)


class ServerProcess(Http):
    """reward_server.py on a free 127.0.0.1 port, its output in a log file; ready when /health answers."""

    def __init__(self, log_path, root, *args, env=None, config=TINY_CONFIG, tokenizer=TOKENIZER):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, str(SERVER), "--config", str(config), "--distributed_ckpt_path", str(root),
             "--tokenizer", str(tokenizer), "--port", str(self.port), *[str(a) for a in args]],
            stdout=self.log, stderr=subprocess.STDOUT, env=dict(cli_env(), **(env or {})))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.read_log()[-3000:]}"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"server not up in 240 s:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status", encoding="utf-8") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class InProcessServer(Http):
    """The same service and app as reward_server.py, built in this process and served by uvicorn from a thread on
    a free 127.0.0.1 port (real HTTP), so a test can reach the batcher's before_pass hook."""

    def __init__(self, service):
        import uvicorn

        from mindrlhf.serving.app import create_app
        from mindrlhf.serving.server import open_socket

        self.service = service
        sock = open_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.app = create_app(service)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-process server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        self.service.batcher.stop()


def build_inprocess(config, root, tokenizer, max_batch=32):
    from mindrlhf.serving.app import Limits
    from mindrlhf.serving.server import build_service

    return InProcessServer(build_service(str(config), str(root), str(tokenizer), Limits(), max_batch=max_batch))


def openrlhf_reward(port, queries, prompts, labels):
    """OpenRLHF 0.11's SingleTurnAgentExecutor._fetch_rewards_via_http for one server, as it runs it: one POST
    of {"query", "prompts", "labels"} with aiohttp (180 s total timeout), raise_for_status, up to 5 tries 1 s
    apart on any error, then RuntimeError (the sample is dropped); the reward is `scores`, else `rewards`.
    Returns (scores, tries)."""
    import asyncio

    import aiohttp

    async def post():
        timeout = aiohttp.ClientTimeout(total=180)
        payload = {"query": queries, "prompts": prompts, "labels": labels}
        for tries in range(1, 6):
            try:
                async with aiohttp.ClientSession(timeout=timeout) as session:
                    async with session.post(f"http://127.0.0.1:{port}/get_reward", json=payload) as response:
                        response.raise_for_status()
                        info = await response.json()
                        return info.get("scores") or info.get("rewards"), tries
            except Exception:  # pylint: disable=broad-except  (OpenRLHF logs and retries any error)
                pass
            await asyncio.sleep(1)
        raise RuntimeError("Request error for 5 times")

    return asyncio.run(post())


def in_parallel(func, args_list, timeout=120):
    """func(*args) in one thread each, started together; results in order (exceptions re-raised)."""
    results = [None] * len(args_list)
    gate = threading.Barrier(len(args_list))

    def call(i, args):
        gate.wait()
        try:
            results[i] = func(*args)
        except Exception as err:  # pylint: disable=broad-except  (re-raised in the main thread)
            results[i] = err

    threads = [threading.Thread(target=call, args=(i, a)) for i, a in enumerate(args_list)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(t.is_alive() for t in threads), "clients hung"
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def listening_address(port: int) -> str:
    """The local address of the socket listening on port, read from the kernel's /proc/net/tcp."""
    with open("/proc/net/tcp", encoding="utf-8") as fh:
        for line in fh.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                return socket.inet_ntoa(bytes.fromhex(host)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A copy of the trained run's newest checkpoint (and its records) as its own checkpoint root, the held-out
    pairs, a rows file of every held-out response plus one longer than seq_length, and reward_eval.py
    --save_stats + reward_infer.py --normalize over them."""
    work = tmp_path_factory.mktemp("serve")
    src = trained_run["checkpoint_root"]
    newest = sorted((src / "rank_0").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    root = work / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    shutil.copy2(newest, root / "rank_0" / newest.name)
    for record in src.glob("*.json"):
        shutil.copy2(record, root / record.name)
    pairs = [json.loads(line) for line in trained_run["heldout"].read_text(encoding="utf-8").splitlines()]
    rows = [{"prompt": p["prompt"], "response": p[k]} for p in pairs for k in ("pos_resp", "neg_resp")]
    long_row = {"prompt": pairs[0]["prompt"], "response": pairs[0]["pos_resp"] * 12}
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + [long_row]),
                         encoding="utf-8")
    run_cli(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path", root,
            "--eval_dataset", trained_run["heldout"], "--tokenizer", TOKENIZER, "--output_file",
            work / "eval.json", "--save_stats")
    scores = work / "scores.jsonl"
    run_cli(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows_file, "--tokenizer",
            TOKENIZER, "--distributed_ckpt_path", root, "--output_file", scores, "--normalize")
    scored = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]
    return {"work": work, "root": root, "checkpoint": root / "rank_0" / newest.name, "rows": rows + [long_row],
            "scored": scored, "held_out": len(rows), "stats": json.loads((root / "reward_stats.json").read_text())}


@pytest.fixture(scope="module")
def server(run):
    """The server as OpenRLHF would use it: defaults, --normalize, no key."""
    proc = ServerProcess(run["work"] / "server.log", run["root"], "--normalize")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def guarded(run):
    """A keyed server with small limits, one text per forward pass, every shape compiled at start. The 0.3 s
    request_timeout only bounds a body that never comes (the scoring timeout is driven by a hook, see
    test_scoring_timeout_answers_503_and_the_next_request_is_served)."""
    proc = ServerProcess(run["work"] / "guarded.log", run["root"], "--max_batch", 1, "--warmup",
                         "--max_body_bytes", 524288, "--max_texts", 128, "--max_chars", 4000, "--max_in_flight", 4,
                         "--request_timeout", 0.3, env={"MINDRLHF_API_KEY": KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def inproc(run):
    """The trained run served in this process (no normalisation, default limits, max_batch 16), its batcher
    reachable by the tests."""
    from mindrlhf.data.tokenizer import load_tokenizer

    server = build_inprocess(TINY_CONFIG, run["root"], TOKENIZER, max_batch=16)  # 16 one-text requests: one batch
    server.tok = load_tokenizer(str(TOKENIZER))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inproc_packed(run, tmp_path_factory):
    """The same, with model_config.packing: pairs (the batcher packs the texts into rows of seq_length). Built with
    the compiled attention kernel when there is a compiler, else with MindSpore ops."""
    from mindrlhf.data.tokenizer import load_tokenizer

    config = tmp_path_factory.mktemp("packed") / "packed.yaml"
    config.write_text(TINY_CONFIG.read_text(encoding="utf-8").replace(
        "    seq_length: 256\n", "    seq_length: 256\n    packing: pairs\n", 1), encoding="utf-8")
    server = build_inprocess(config, run["root"], TOKENIZER, max_batch=16)
    assert server.service.batcher.packing and server.service.info["packing"] == "pairs"
    server.tok = load_tokenizer(str(TOKENIZER))
    yield server
    server.stop()


def template_text(prompt, response):
    from mindrlhf.data.prompt import format_prompt

    return format_prompt(prompt, response)


# -- normalisation ------------------------------------------------------------------------------------------
def test_normalised_scores_have_mean_0_and_std_1_on_their_set(run):
    stats, scored = run["stats"], run["scored"][:run["held_out"]]
    assert stats["count"] == run["held_out"] and stats["checkpoint"] == f"rank_0/{run['checkpoint'].name}"
    raw = np.array([s["raw_score"] for s in scored])
    normalised = np.array([s["score"] for s in scored])
    assert abs(raw.mean() - stats["mean"]) < 1e-5 and abs(raw.std() - stats["std"]) < 1e-5
    assert abs(normalised.mean()) < 1e-5 and abs(normalised.std() - 1) < 1e-5
    np.testing.assert_allclose(normalised, (raw - stats["mean"]) / stats["std"], atol=1e-9)


# -- the server as a client sees it ---------------------------------------------------------------------------
def test_health_reports_what_is_served_on_loopback(server, run):
    from mindrlhf.serving.server import bind_warning

    status, health, _ = server.get("/health")
    assert status == 200 and health["status"] == "ok"
    assert health["checkpoint"] == str(run["checkpoint"]) and health["step"] == run["stats"]["step"]
    assert health["config"] == str(TINY_CONFIG) and health["seq_length"] == 256
    assert health["normalization"]["mean"] == run["stats"]["mean"] and not health["api_key_required"]
    assert health["host"] == "127.0.0.1" and listening_address(server.port) == "127.0.0.1"  # the default bind
    assert "listening on http://127.0.0.1:" in server.read_log()
    # the start-up warning's rule (no socket is opened for these names)
    assert bind_warning("127.0.0.1", False) is None and bind_warning("::1", False) is None
    assert "no API key" in bind_warning("0.0.0.0", False) and bind_warning("0.0.0.0", True) is None


def test_32_concurrent_clients_get_reward_infer_scores(server, run):
    """Each client sends one row, by /score (prompt, response) or /get_reward (the rendered full text); every
    answer is reward_infer.py's score for that row, normalised and raw, the over-long row truncated and said so."""
    from mindrlhf.data.tokenizer import load_tokenizer

    rows, scored = run["rows"], run["scored"]
    picks = list(range(0, run["held_out"], run["held_out"] // 31))[:31] + [len(rows) - 1]
    lengths = [len(x) for x in load_tokenizer(str(TOKENIZER)).encode(
        [template_text(rows[i]["prompt"], rows[i]["response"]) for i in picks])]
    assert lengths[-1] > 256

    def ask(k, i):
        row = rows[i]
        if k % 2:
            return server.post("/get_reward", {"query": [template_text(row["prompt"], row["response"])]})
        return server.post("/score", {"prompt": row["prompt"], "response": row["response"]})

    answers = in_parallel(ask, list(enumerate(picks)))
    for (status, body, _), i, length in zip(answers, picks, lengths):
        assert status == 200, body
        assert body["rewards"][0] == pytest.approx(scored[i]["score"], abs=1e-5)
        assert body["raw_rewards"][0] == pytest.approx(scored[i]["raw_score"], abs=1e-5)
        assert body["num_tokens"] == [length] and body["truncated"] == ([0] if length > 256 else [])
    assert "truncated" in answers[-1][1]["note"]
    assert answers[1][1]["scores"] == answers[1][1]["rewards"]  # OpenRLHF's newer key too
    counts = server.get("/health")[1]["counts"]
    assert counts["forward_passes"] < counts["sequences"]  # requests were batched together


BAD = [  # (path, body, status, limit)
    ("/get_reward", b"{not json", 400, "json"),
    ("/get_reward", b"[" * 100000, 400, "json"),  # nesting deeper than the parser recurses
    ("/get_reward", b"[1, 2]", 400, "body"),
    ("/get_reward", b'{"prompts": ["a"]}', 400, "missing_field"),
    ("/get_reward", b'{"query": "one text, not a list"}', 400, "field_type"),
    ("/get_reward", b'{"query": []}', 400, "empty"),
    ("/get_reward", b'{"query": ["fine", 3]}', 400, "field_type"),
    ("/get_reward", b'{"query": [""]}', 400, "empty_text"),
    ("/score", b'{"prompt": "only a prompt"}', 400, "missing_field"),
    ("/score", b'{"prompt": 1, "response": "x"}', 400, "field_type"),
    ("/score", b'{"items": []}', 400, "empty"),
    ("/score", b'{"items": ["not an object"]}', 400, "field_type"),
]


def test_each_bad_request_gets_its_4xx_and_the_next_is_served(server):
    good = {"prompt": "你好", "response": "你好！"}
    expected = server.post("/score", good)[1]["rewards"]
    for path, body, status, limit in BAD:
        got, answer, _ = server.post(path, None, raw=body)
        assert (got, answer["limit"]) == (status, limit), (body[:40], answer)
        assert answer["error"]
        assert server.post("/score", good)[1]["rewards"] == expected
    assert server.request("GET", "/score")[0] == 405 and server.request("POST", "/etc/passwd", b"{}")[0] == 404
    assert server.proc.poll() is None


# -- key and limits ------------------------------------------------------------------------------------------
def test_api_key_required_and_never_logged(guarded):
    good = {"prompt": "你好", "response": "你好！"}
    assert guarded.post("/score", good)[0] == 401
    status, answer, headers = guarded.post("/score", good, key="wrong-" + KEY)
    assert status == 401 and answer["limit"] == "api_key" and headers.get("www-authenticate") == "Bearer"
    assert guarded.post("/get_reward", {"query": ["x"]}, key=KEY[:-1])[0] == 401
    assert guarded.post("/classify", {"input": ["x"]})[0] == 401  # every contract behind the same key
    assert guarded.post("/v1/score/evaluation", {"model": "m", "messages": ["x"]}, key="wrong")[0] == 401
    assert guarded.post("/score", good, key=KEY)[0] == 200
    assert guarded.post("/classify", {"input": ["x"]}, key=KEY)[0] == 200
    assert guarded.post("/v1/score/evaluation", {"model": "m", "messages": ["x"]}, key=KEY)[0] == 200
    assert guarded.get("/health")[0] == 200  # health needs no key
    log = guarded.read_log()
    assert log.count("401 POST") == 5 and "no Authorization header" in log and "wrong key" in log
    assert KEY not in log and KEY[:-1] not in log
    assert KEY not in " ".join(open(f"/proc/{guarded.proc.pid}/cmdline", encoding="utf-8").read().split("\0"))


def slow_body(port, timeout=10):
    """Headers promise 100 bytes, 10 come: the answer to a body that never arrives."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ")[1])


def test_each_limit_answers_and_the_next_request_is_served(guarded):
    good = {"prompt": "你好", "response": "你好！"}

    def ok():
        status, answer, _ = guarded.post("/score", good, key=KEY)
        assert status == 200, answer

    cases = [({"query": ["x" * 600000]}, 413, "max_body_bytes"),
             ({"query": ["x"] * 129}, 413, "max_texts"),
             ({"query": ["x" * 4001]}, 413, "max_chars"),
             ({"items": [{"prompt": "p", "response": "x" * 4001}]}, 413, "max_chars")]
    for body, status, limit in cases:
        path = "/get_reward" if "query" in body else "/score"
        got, answer, _ = guarded.post(path, body, key=KEY)
        assert (got, answer["limit"]) == (status, limit) and limit in answer["error"]
        ok()
    # a body sent in chunks, with no Content-Length, is counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    conn.request("POST", "/get_reward", body=iter([b'{"query": ["', b"y" * 300000, b"y" * 300000, b'"]}']),
                 headers={"Authorization": f"Bearer {KEY}"}, encode_chunked=True)
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())["limit"]) == (413, "max_body_bytes")
    conn.close()
    ok()
    assert slow_body(guarded.port) == 408  # request_timeout while the body does not come
    ok()
    assert guarded.proc.poll() is None


def test_burst_over_the_in_flight_limit_gets_503s_not_a_hang(guarded):
    body = {"prompt": "你好", "response": "你好！" * 20}

    def burst():
        began = time.monotonic()
        answers = in_parallel(lambda: guarded.post("/score", body, key=KEY, timeout=30), [()] * 200, timeout=90)
        return time.monotonic() - began, [a[0] for a in answers], answers

    guarded.post("/score", body, key=KEY)
    rss = [guarded.rss_kib()]
    for _ in range(2):
        took, statuses, answers = burst()
        rss.append(guarded.rss_kib())
        assert took < 60 and set(statuses) <= {200, 503}
        busy = [a for a in answers if a[0] == 503]
        assert any(a[1]["limit"] == "max_in_flight" for a in busy)  # a loaded machine may also time some out
        assert all(a[1]["limit"] in ("max_in_flight", "request_timeout") and a[2].get("retry-after") == "1"
                   for a in busy)
    assert guarded.post("/score", body, key=KEY)[0] == 200
    assert rss[2] - rss[1] < 16 * 1024, rss  # a second burst costs no more memory than the first left
    assert rss[1] - rss[0] < 64 * 1024, rss


# -- what RL loops send (issue 20) ------------------------------------------------------------------------------
def hf_llama2_tokenizers():
    """transformers' slow and fast Llama tokenizers over the repo's Llama 2 tokenizer.model (no download)."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    return {"slow": LlamaTokenizer(vocab_file=str(TOKENIZER), legacy=True),
            "fast": LlamaTokenizerFast(vocab_file=str(TOKENIZER), legacy=True)}


def short_picks(run, count=6):
    """Held-out rows whose rendered text fits seq_length (so the end of the text is what is scored)."""
    from mindrlhf.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    rows = run["rows"][:run["held_out"]]
    lengths = [len(x) for x in tok.encode([template_text(r["prompt"], r["response"]) for r in rows])]
    return [i for i, n in enumerate(lengths) if n < 200][:count]


def test_openrlhf_llamafactory_clients_score_decoded_llama2_rollouts_as_reward_infer(server, run):
    """A rollout decoded as OpenRLHF decodes it (transformers' Llama tokenizer, skip_special_tokens=False: BOS and
    EOS written as `<s> ...</s>`) scores exactly as reward_infer.py scores the plain row, through OpenRLHF's own
    request handling and a LLaMA-Factory-style /v1/score/evaluation call."""
    from mindrlhf.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    picks = short_picks(run)
    rows, scored = run["rows"], run["scored"]
    plain = [template_text(rows[i]["prompt"], rows[i]["response"]) for i in picks]
    ids = tok.encode(plain)
    for name, hf in hf_llama2_tokenizers().items():
        queries = [hf.decode([hf.bos_token_id] + x + [hf.eos_token_id], skip_special_tokens=False) for x in ids]
        assert all(q.startswith("<s>") and q.endswith("</s>") for q in queries), (name, queries[0][:20])
        answers = in_parallel(lambda q, i: openrlhf_reward(server.port, [q], [rows[i]["prompt"]], [None]),
                              list(zip(queries, picks)))
        for (scores, tries), i in zip(answers, picks):
            assert tries == 1 and scores[0] == pytest.approx(scored[i]["score"], abs=1e-5), (name, i)
        status, answer, _ = server.post("/v1/score/evaluation", {"model": "rm", "messages": queries})
        assert status == 200 and answer["object"] == "score.evaluation" and answer["id"].startswith("scoreval-")
        assert answer["scores"] == pytest.approx([scored[i]["score"] for i in picks], abs=1e-5)
    # vLLM's default activation: sigmoid of the reward; a list of texts; both names of the switch
    status, answer, _ = server.post("/v1/classify", {"input": plain[:2]})
    assert status == 200 and answer["object"] == "list" and answer["id"].startswith("classify-")
    assert [d["index"] for d in answer["data"]] == [0, 1] and answer["usage"]["completion_tokens"] == 0
    assert [d["probs"][0] for d in answer["data"]] == pytest.approx(
        [1 / (1 + np.exp(-scored[i]["score"])) for i in picks[:2]], abs=1e-6)
    for flags in ({"activation": False}, {"use_activation": False}, {"activation": False, "use_activation": False}):
        status, answer, _ = server.post("/classify", dict(flags, input=plain[0]))
        assert status == 200 and answer["data"][0]["probs"] == pytest.approx([scored[picks[0]]["score"]], abs=1e-5)
    status, answer, _ = server.post("/classify", {"input": plain[0], "activation": False, "use_activation": True})
    assert status == 400 and answer["limit"] == "conflict" and "use_activation" in answer["error"], answer
    health = server.get("/health")[1]
    assert "<s>" in json.dumps(health["full_texts"]) and "policy's prompt format" in health["full_texts"]["why"]
    # reward_infer.py normalises {"query"} rows with the same code
    rows_file = run["work"] / "decoded_queries.jsonl"
    rows_file.write_text("".join(json.dumps({"query": q}, ensure_ascii=False) + "\n" for q in queries),
                         encoding="utf-8")
    out = run["work"] / "decoded_scores.jsonl"
    run_main(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows_file, "--tokenizer",
             TOKENIZER, "--distributed_ckpt_path", run["root"], "--output_file", out, "--normalize", "--overwrite")
    assert [json.loads(line)["score"] for line in out.read_text(encoding="utf-8").splitlines()] == pytest.approx(
        [scored[i]["score"] for i in picks], abs=1e-5)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from families import train_tokenizer

    work = tmp_path_factory.mktemp("serve_tokenizers")
    return {style: train_tokenizer(work / style, style) for style in ("qwen2", "llama3")}


def llama2_chat_template(folder):
    """Llama 2's chat template, reduced to one user and one assistant turn."""
    path = folder / "llama2_chat.jinja"
    path.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] "
                    "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
                    encoding="utf-8")
    return path


def test_only_the_serving_tokenizers_own_spelling_is_normalised(hf_folders, tmp_path):
    """`<s>` means BOS only to the Llama 2 tokenizer, `<|im_end|>` only to the Qwen one: in another tokenizer's
    spelling they are ordinary text. Repeated BOS collapse to the template's one."""
    from mindrlhf.data.templates import TUTORIAL, FullTextNormaliser, resolve_template
    from mindrlhf.data.tokenizer import load_tokenizer

    llama2_tok = load_tokenizer(str(TOKENIZER))
    llama2 = FullTextNormaliser.build(TUTORIAL, llama2_tok)
    assert llama2("<s><s> 你好</s>") == "你好"
    assert llama2("<s> Use <s>old</s></s>") == "Use <s>old</s>"  # one EOS appended by the loop, HTML's kept
    # Llama 2's chat template renders ' ' + eos after the answer; a policy stops right after its last word. Chat
    # templates need a tokenizer.json: the one transformers converts from the same tokenizer.model.
    hf_llama2_tokenizers()["fast"].save_pretrained(str(tmp_path / "llama2_fast"))
    fast = load_tokenizer(str(tmp_path / "llama2_fast" / "tokenizer.json"))
    template = resolve_template(str(llama2_chat_template(tmp_path)), fast)
    llama2_chat = FullTextNormaliser.build(template, fast)
    decoded = "<s>[INST] Hi [/INST] Hello there</s>"  # as the policy's ids decode: no space before </s>
    assert llama2_chat(decoded) == template.render("Hi", "Hello there") == "<s>[INST] Hi [/INST] Hello there </s>"
    assert fast.encode([llama2_chat(decoded)], special_tokens=template.special_tokens) == \
        fast.encode([template.render("Hi", "Hello there")], special_tokens=template.special_tokens)
    assert llama2("<|begin_of_text|>你好<|im_end|>") == "<|begin_of_text|>你好<|im_end|>"
    qwen_tok = load_tokenizer(str(hf_folders["qwen2"]))
    qwen = FullTextNormaliser.build(resolve_template("chat", qwen_tok), qwen_tok)
    assert qwen("<s> 你好</s>") == "<s> 你好</s>" and qwen("a<|im_end|>") == "a<|im_end|>\n"
    assert qwen("a<|im_end|>\n") == "a<|im_end|>\n"
    llama3_tok = load_tokenizer(str(hf_folders["llama3"]))
    llama3 = FullTextNormaliser.build(resolve_template("chat", llama3_tok), llama3_tok)
    for sent in ("x<|eot_id|>", "<|begin_of_text|>x<|eot_id|>", "<|begin_of_text|><|begin_of_text|>x<|eot_id|>"):
        assert llama3(sent) == "<|begin_of_text|>x<|eot_id|>", sent  # none, one or several BOS: the template's one
    assert llama3("<s>x</s>") == "<|begin_of_text|><s>x</s>"  # Llama 2's spelling is text; the BOS is put back
    llama3_tutorial = FullTextNormaliser.build(TUTORIAL, llama3_tok)  # the tokenizer adds the BOS; no EOS
    assert llama3_tutorial("<|begin_of_text|>x<|eot_id|>") == "x"


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def family_run(request, hf_folders, tmp_path_factory):
    """A Llama 3 / Qwen2.5 tiny reward model (random weights) recorded with the family's chat template, served
    in this process; reward_infer.py's scores of a few plain rows."""
    import mindspore as ms

    from families import FAMILIES
    from mindrlhf.data.templates import resolve_template, write_run_template
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.scorer import RewardScorer

    family, folder = request.param, hf_folders[request.param]
    config = FAMILIES[family]["config"]
    work = tmp_path_factory.mktemp(f"serve_{family}")
    tok = load_tokenizer(str(folder))
    template = resolve_template("chat", tok)
    root = work / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    ms.set_seed(3)
    ms.save_checkpoint(RewardScorer(str(config), batch_size=4, log=lambda *_: None).network,
                       str(root / "rank_0" / "random.ckpt"))
    write_run_template(str(root), template)
    pairs = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()[:60]]
    rows = [{"prompt": p["prompt"], "response": p[k]} for p in pairs for k in ("pos_resp", "neg_resp")]
    lengths = [len(x) for x in template.encode(tok, [r["prompt"] for r in rows], [r["response"] for r in rows])]
    rows = [r for r, n in zip(rows, lengths) if n < 120][:6]
    assert len(rows) == 6
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_main(EXAMPLES / "reward_infer.py", "--config", config, "--data_file", data, "--tokenizer", folder,
             "--distributed_ckpt_path", root, "--output_file", work / "scores.jsonl")  # test_backbones: as a process
    scored = [json.loads(line)["score"] for line in (work / "scores.jsonl").read_text().splitlines()]
    assert np.std(scored) > 1e-4  # scores that differ: a wrong token would show
    server = build_inprocess(config, root, folder)
    yield {"family": family, "folder": folder, "tok": tok, "template": template, "rows": rows, "scored": scored,
           "server": server}
    server.stop()


def test_decoded_chat_rollouts_score_as_reward_infer(family_run):
    """Llama 3 / Qwen2.5 (tokenizer.json, chat template): the rollout's ids decoded by transformers with
    skip_special_tokens=False, as OpenRLHF builds its query (Qwen's generation stops at <|im_end|>, before the
    template's newline; a prompt tokenized with its BOS again gives two), score as reward_infer.py scores the
    plain rows, through OpenRLHF's and LLaMA-Factory's contracts."""
    from transformers import AutoTokenizer

    run = family_run
    hf = AutoTokenizer.from_pretrained(str(run["folder"]))
    template, server = run["template"], run["server"]
    rendered = [template.render(r["prompt"], r["response"]) for r in run["rows"]]
    queries = []
    for text in rendered:
        ids = run["tok"].encode([text], special_tokens=False)[0]
        if run["family"] == "qwen2":
            assert hf.decode(ids[-1:]) == "\n"
            ids = ids[:-1]  # vLLM stops at the EOS <|im_end|>: the template's "\n" after it never comes
        else:
            ids = [hf.bos_token_id] + ids  # the chat-templated prompt tokenized with add_special_tokens=True
        queries.append(hf.decode(ids, skip_special_tokens=False))
    assert all(q != t for q, t in zip(queries, rendered))  # what is sent is not what was trained on
    answers = in_parallel(lambda q, r: openrlhf_reward(server.port, [q], [r["prompt"]], [None]),
                          list(zip(queries, run["rows"])))
    assert [a[0][0] for a in answers] == pytest.approx(run["scored"], abs=1e-5)
    status, answer, _ = server.post("/v1/score/evaluation", {"model": "rm", "messages": queries})
    assert status == 200 and answer["scores"] == pytest.approx(run["scored"], abs=1e-5)


def verl_texts(hf, rows):
    """What verl's reward loop (verl/experimental/reward_loop/reward_loop.py, _preprocess_reward_inputs) posts for
    each row: the policy's response ids (ending in its EOS) decoded, the EOS text removed, put in an assistant turn
    after the user turn, rendered by the reward model's tokenizer with apply_chat_template(tokenize=False), and a
    leading BOS text stripped (vLLM adds one)."""
    texts = []
    for row in rows:
        response_ids = hf.encode(row["response"], add_special_tokens=False) + [hf.eos_token_id]
        response = hf.decode(response_ids).replace(hf.eos_token, "")
        chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": response}]
        text = hf.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
        if hf.bos_token is not None and text.startswith(hf.bos_token):
            text = text[len(hf.bos_token):]
        texts.append(text)
    return texts


def test_verl_reward_loop_on_vllm_and_sglang_engines_scores_as_reward_infer(family_run):
    """verl's reward loop as it calls a discriminative reward model: one text per request, to the vLLM engine's
    /classify with use_activation false (it reads data[-1].probs[-1]) and to the SGLang engine's /v1/embeddings (it
    reads data[-1].embedding[-1]). Llama 3's template renders a BOS that verl strips: it is put back."""
    from transformers import AutoTokenizer

    run = family_run
    hf = AutoTokenizer.from_pretrained(str(run["folder"]))
    server = run["server"]
    texts = verl_texts(hf, run["rows"])
    if run["family"] == "llama3":
        assert hf.bos_token and not any(t.startswith(hf.bos_token) for t in texts)
        assert run["template"].render("p", "r").startswith(hf.bos_token)

    def vllm(text):
        status, answer, _ = server.post("/classify", {"model": "/models/rm", "input": text, "use_activation": False})
        assert status == 200 and answer["model"] == "/models/rm", answer
        return answer["data"][-1]["probs"][-1]

    def sglang(text):
        status, answer, _ = server.post("/v1/embeddings", {"model": "/models/rm", "input": text})
        assert status == 200 and answer["object"] == "list" and answer["data"][-1]["object"] == "embedding", answer
        assert answer["usage"]["prompt_tokens"] > 0 and answer["model"] == "/models/rm"
        return answer["data"][-1]["embedding"][-1]

    for call in (vllm, sglang):
        assert in_parallel(call, [(t,) for t in texts]) == pytest.approx(run["scored"], abs=1e-5), call.__name__
    status, answer, _ = server.post("/v1/embeddings", {"input": texts[:2]})  # a list: one embedding each
    assert status == 200 and [d["index"] for d in answer["data"]] == [0, 1]
    assert [d["embedding"][0] for d in answer["data"]] == pytest.approx(run["scored"][:2], abs=1e-5)


def holds(batch, ids) -> bool:
    """Whether a pass's rows (int32 arrays) hold this token id sequence."""
    return any(np.array_equal(row, ids) for row in batch)


def held_batch(inproc, texts, fails):
    """Send texts[1:] as one-text requests that the batcher collects into one batch: texts[0], the plug, holds the
    batcher inside its pass until all of them wait in its queue. `fails(batch)` may raise in any later pass.
    Returns {k: (status, answer, headers)} for k = 1 .. len(texts) - 1."""
    service, batcher = inproc.service, inproc.service.batcher
    plug = service.encode([texts[0]])[0]
    entered, held = threading.Event(), threading.Event()

    def before_pass(batch):
        if holds(batch, plug):
            entered.set()
            held.wait(60)  # the batcher is busy until the requests wait in its queue
        else:
            fails(batch)

    batcher.before_pass = before_pass
    try:
        plug_thread = threading.Thread(target=inproc.post, args=("/get_reward", {"query": [texts[0]]}))
        plug_thread.start()
        assert entered.wait(60), "the plug request never reached a forward pass"
        results = {}

        def client(k):
            results[k] = inproc.post("/get_reward", {"query": [texts[k]]})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(1, len(texts))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while service.in_flight < len(texts) or batcher.jobs.qsize() < len(texts) - 1:
            assert time.monotonic() < deadline, (service.in_flight, batcher.jobs.qsize())
            time.sleep(0.01)
        held.set()
        for thread in threads + [plug_thread]:
            thread.join(120)
    finally:
        batcher.before_pass = None
        held.set()
    return results


@pytest.mark.parametrize("served", ["inproc", "inproc_packed"])
def test_a_failing_pass_fails_only_its_culprit(served, run, request):
    """16 one-text requests collected into one batch; the injected failure hits the pass holding the culprit's
    row: the 15 others get reward_infer.py's scores, the culprit a 500 naming the reason. Padded and packed."""
    inproc = request.getfixturevalue(served)
    service, batcher = inproc.service, inproc.service.batcher
    rows, scored = run["rows"], run["scored"]
    picks = short_picks(run, 17)
    texts = [template_text(rows[i]["prompt"], rows[i]["response"]) for i in picks]
    culprit = service.encode([texts[5]])[0]

    def fails(batch):
        if holds(batch, culprit):
            raise RuntimeError("injected: this row breaks the forward pass")

    before = dict(batcher.counts)
    results = held_batch(inproc, texts, fails)
    assert batcher.counts["collected_batches"] - before["collected_batches"] == 2  # the plug, then the 16
    assert batcher.counts["failed_jobs"] - before["failed_jobs"] == 1
    assert batcher.counts["failed_passes"] == before["failed_passes"]  # one request failed, not the model
    for k in range(1, 17):
        status, answer, _ = results[k]
        if k == 5:
            assert status == 500 and answer["limit"] == "scoring" and "injected" in answer["error"], answer
        else:
            assert status == 200, answer
            assert answer["rewards"][0] == pytest.approx(scored[picks[k]]["raw_score"], abs=1e-5)
    assert inproc.post("/get_reward", {"query": [texts[5]]})[0] == 200  # nothing is broken for good


@pytest.mark.parametrize("served", ["inproc", "inproc_packed"])
def test_a_model_failing_every_pass_is_told_from_a_culprit(served, run, request):
    """Every pass raises (a broken model): each of the 4 requests fails alone too, and /health counts the pass
    as one where every request failed, so an operator sees the model, not 4 bad requests. Padded and packed."""
    inproc = request.getfixturevalue(served)
    rows = run["rows"]
    texts = [template_text(rows[i]["prompt"], rows[i]["response"]) for i in short_picks(run, 5)]
    before = dict(inproc.service.batcher.counts)

    def fails(batch):
        raise RuntimeError("injected: the model is broken")

    results = held_batch(inproc, texts, fails)
    assert all(status == 500 and "also alone" in answer["error"] for status, answer, _ in results.values())
    counts = inproc.get("/health")[1]["counts"]
    assert counts["failed_passes"] - before["failed_passes"] == 1, counts
    assert counts["failed_jobs"] - before["failed_jobs"] == 4, counts


def test_a_pass_is_counted_before_its_answers_go_out(inproc):
    """/health read right after an answer shows that answer's pass: the batcher counts a failed pass (and its failed
    request) before it sets the request's result, so a callback run as the answer is set already sees them."""
    service, batcher = inproc.service, inproc.service.batcher
    before, seen, done = dict(batcher.counts), [], threading.Event()

    def fails(batch):
        raise RuntimeError("injected: the model is broken")

    batcher.before_pass = fails
    try:
        job = batcher.submit(service.encode([template_text("问题", "回答")]))
        job.future.add_done_callback(lambda _: (seen.append(dict(batcher.counts)), done.set()))
        assert done.wait(60), "the job was never answered"
    finally:
        batcher.before_pass = None
    assert isinstance(job.future.exception(), RuntimeError)
    assert seen[0]["failed_passes"] - before["failed_passes"] == 1, seen[0]
    assert seen[0]["failed_jobs"] - before["failed_jobs"] == 1, seen[0]


def test_scoring_timeout_answers_503_and_the_next_request_is_served(inproc, monkeypatch):
    """request_timeout while scoring, driven by a hook that holds the pass until the client has its answer."""
    service = inproc.service
    text = template_text("超时测试", "等待。")
    ids = service.encode([text])[0]
    release = threading.Event()
    service.batcher.before_pass = lambda batch: release.wait(60) if holds(batch, ids) else None
    try:
        with monkeypatch.context() as patch:
            patch.setattr(service.limits, "request_timeout", 0.5)
            status, answer, headers = inproc.post("/get_reward", {"query": [text]})
    finally:
        release.set()
        service.batcher.before_pass = None
    assert status == 503 and answer["limit"] == "request_timeout" and headers.get("retry-after") == "1"
    assert inproc.post("/get_reward", {"query": [text]})[0] == 200


def test_unencodable_text_and_foreign_ids_are_named_json_answers(server, inproc, monkeypatch):
    """A lone surrogate is valid JSON and no text: a 400 naming the field, on every contract. Token ids beyond
    the model's vocabulary are refused before any pass."""
    for path, body, field in [("/get_reward", b'{"query": ["ok", "a\\ud800b"]}', "query[1]"),
                              ("/classify", b'{"input": "\\ud800"}', "input[0]"),
                              ("/v1/score/evaluation", b'{"model": "m", "messages": ["\\udfff"]}', "messages[0]"),
                              ("/score", b'{"prompt": "p", "response": "\\ud800"}', "items[0].response"),
                              # echoed fields are texts too
                              ("/classify", b'{"model": "\\ud800", "input": "x"}', "model"),
                              ("/v1/embeddings", b'{"model": "a\\udfffb", "input": ["x"]}', "model"),
                              ("/v1/score/evaluation", b'{"model": "\\ud800", "messages": ["x"]}', "model")]:
        status, answer, _ = server.post(path, None, raw=body)
        assert status == 400 and answer["limit"] == "encoding" and field in answer["error"], (path, answer)
    monkeypatch.setattr(inproc.service, "vocab_size", 300)
    passes = inproc.service.batcher.counts["forward_passes"]
    status, answer, _ = inproc.post("/get_reward", {"query": ["你好"]})
    assert status == 422 and answer["limit"] == "vocab" and "query[0]" in answer["error"], answer
    assert inproc.service.batcher.counts["forward_passes"] == passes


def test_a_lone_failed_pass_is_counted_and_a_dead_batcher_is_told(inproc, run, monkeypatch):
    """One request alone whose pass fails: /health counts the failed pass. A batcher thread that dies (an error no
    pass catches) answers the request it held, /health says so with a 503, and later requests get a 503 at once."""
    service, batcher = inproc.service, inproc.service.batcher
    text = template_text(run["rows"][0]["prompt"], run["rows"][0]["response"])
    before = dict(batcher.counts)

    def broken(batch):
        raise RuntimeError("injected: the model is broken")

    batcher.before_pass = broken
    try:
        status, answer, _ = inproc.post("/get_reward", {"query": [text]})
    finally:
        batcher.before_pass = None
    assert status == 500 and answer["limit"] == "scoring", answer
    counts = inproc.get("/health")[1]["counts"]
    assert counts["failed_passes"] - before["failed_passes"] == 1 and counts["failed_jobs"] - before["failed_jobs"] == 1

    def dies(batch):
        raise SystemExit("injected: the thread ends")

    monkeypatch.setattr(service.limits, "request_timeout", 20.0)
    batcher.before_pass = dies
    try:
        status, answer, _ = inproc.post("/get_reward", {"query": [text]}, timeout=30)
        assert status == 500 and "batcher thread stopped" in answer["error"], answer
        batcher.thread.join(10)
        status, health, _ = inproc.get("/health")
        assert status == 503 and health["batcher_alive"] is False and health["status"] == "batcher_stopped"
        status, answer, _ = inproc.post("/get_reward", {"query": [text]}, timeout=30)
        assert status == 503 and answer["limit"] == "batcher", answer
    finally:
        batcher.before_pass = None
        if not batcher.thread.is_alive():
            batcher.start()
    status, health, _ = inproc.get("/health")
    assert status == 200 and health["batcher_alive"] is True
    assert inproc.post("/get_reward", {"query": [text]})[0] == 200


@pytest.fixture(scope="module")
def extreme(run, tmp_path_factory):
    """The trained run with its value head scaled by -1e4 or 1e4, whichever makes its mean reward negative
    (rewards far below exp()'s range), and with one weight of it set to inf (rewards of +-inf or NaN): real
    checkpoints, each served in this process."""
    import mindspore as ms

    servers, scale = {}, -1e4 if run["stats"]["mean"] > 0 else 1e4
    for name, change in (("huge", lambda w: w * scale), ("inf", lambda w: np.where(np.arange(w.size).reshape(w.shape)
                                                                                   == 0, np.inf, w))):
        root = tmp_path_factory.mktemp(f"extreme_{name}") / "checkpoint"
        (root / "rank_0").mkdir(parents=True)
        params = ms.load_checkpoint(str(run["checkpoint"]))
        params["v_head.weight"] = ms.Parameter(ms.Tensor(change(params["v_head.weight"].asnumpy()).astype(
            np.float32)), name="v_head.weight")
        ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(root / "rank_0" / "x.ckpt"))
        for record in run["root"].glob("*.json"):
            if record.name != "reward_stats.json":  # the statistics belong to the trained weights
                shutil.copy2(record, root / record.name)
        servers[name] = build_inprocess(TINY_CONFIG, root, TOKENIZER, max_batch=4)
    yield servers
    for server in servers.values():
        server.stop()


def test_extreme_rewards_are_answered_right(extreme, run):
    """A reward of -1e4 has a sigmoid (0, not an OverflowError); a reward of +-inf or NaN is never sent as a number:
    a JSON 500 `non_finite` naming the inputs, counted in /health, not as answered."""
    texts = [template_text(r["prompt"], r["response"]) for r in run["rows"][:8]]
    huge = extreme["huge"]
    status, answer, _ = huge.post("/classify", {"input": texts, "use_activation": False})
    assert status == 200, answer
    raw = [d["probs"][0] for d in answer["data"]]
    assert min(raw) < -1000, raw  # past exp()'s range
    status, answer, _ = huge.post("/classify", {"input": texts})
    assert status == 200 and [d["probs"][0] for d in answer["data"]] == [float(r > 0) for r in raw], answer
    inf = extreme["inf"]
    before = inf.get("/health")[1]["counts"]
    for path, body in (("/get_reward", {"query": texts[:3]}), ("/v1/embeddings", {"input": texts[0]}),
                       ("/score", {"prompt": "p", "response": "r"})):
        status, answer, _ = inf.post(path, body)
        assert status == 500 and answer["limit"] == "non_finite", (path, answer)
        field = {"/get_reward": "query[0, 1, 2]", "/v1/embeddings": "input[0]", "/score": "items[0]"}[path]
        assert field in answer["error"], answer
    counts = inf.get("/health")[1]["counts"]
    assert counts["answered"] == before["answered"] and counts["non_finite"] - before["non_finite"] == 3


def test_limits_must_be_finite_and_positive(run):
    from mindrlhf.errors import ConfigError
    from mindrlhf.serving.app import Limits

    for value in ("nan", "inf", "-1", "0"):
        proc = run_main(SERVER, "--config", TINY_CONFIG, "--distributed_ckpt_path", run["root"], "--tokenizer",
                        TOKENIZER, "--request_timeout", value, check=False)
        assert proc.returncode == 2 and "--request_timeout must be a finite positive number" in proc.stderr, \
            (value, proc.stderr[-500:])
    with pytest.raises(ConfigError, match="--max_in_flight must be a finite positive number"):
        Limits(max_in_flight=float("inf")).check()


def asgi_get(app, path, client, headers=()):
    """GET through the ASGI app as uvicorn calls it, from a given peer address (tests never leave loopback)."""
    import asyncio

    sent = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": client,
             "server": ("192.0.2.1", 5000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_health_beyond_loopback_without_the_key_shows_no_paths(inproc, run, monkeypatch):
    def paths(health):
        return [v for v in json.dumps(health).split('"') if v.startswith("/")]

    status, local, _ = inproc.get("/health")
    assert status == 200 and local["checkpoint"] == str(run["checkpoint"]) and paths(local)
    remote = ("203.0.113.7", 40000)
    status, health = asgi_get(inproc.app, "/health", remote)
    assert status == 200 and not paths(health) and str(run["root"]) not in json.dumps(health)
    assert health["checkpoint"] == run["checkpoint"].name and health["step"] == local["step"]
    assert health["template"] == local["template"] == "tutorial" and health["config"] == TINY_CONFIG.name
    monkeypatch.setattr(inproc.service, "_key", KEY.encode())
    assert paths(asgi_get(inproc.app, "/health", remote, [("Authorization", f"Bearer {KEY}")])[1])
    assert not paths(asgi_get(inproc.app, "/health", remote, [("Authorization", "Bearer wrong")])[1])
    # with a key, loopback is no pass (behind a loopback proxy every caller is local): the key is
    assert not paths(inproc.get("/health")[1])
    assert not paths(asgi_get(inproc.app, "/health", ("127.0.0.1", 40000))[1])
    assert paths(asgi_get(inproc.app, "/health", ("127.0.0.1", 40000), [("Authorization", f"Bearer {KEY}")])[1])


# -- shutdown (last use of `server`) --------------------------------------------------------------------------
def test_sigterm_answers_every_request_in_flight_then_exits_0(server, run):
    texts = [template_text(r["prompt"], r["response"]) for r in run["rows"][:64]]
    before = server.get("/health")[1]["counts"]["answered"]
    results = {}

    def client(i):
        results[i] = server.post("/get_reward", {"query": texts}, timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = server.get("/health")[1]
        if health["in_flight"] + health["counts"]["answered"] - before == 8:
            break
        time.sleep(0.02)
    assert health["in_flight"] >= 1, "every request finished before SIGTERM: nothing was tested"
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert server.proc.wait(timeout=120) == 0
    assert sorted(results) == list(range(8)) and all(r[0] == 200 and len(r[1]["rewards"]) == 64
                                                    for r in results.values())
    with pytest.raises(OSError):
        server.get("/health")


# -- Hugging Face export ---------------------------------------------------------------------------------------
def test_export_loads_as_llama_sequence_classification_and_round_trips(run):
    import mindspore as ms
    from safetensors.numpy import load_file

    from mindrlhf.errors import OutputExistsError
    from mindrlhf.interop.hf_export import export_checkpoint
    from mindrlhf.interop.hf_folder import ms_to_hf_name
    from mindrlhf.training.config import load_config

    out = run["work"] / "hf"
    proc = run_cli(SCRIPTS / "export_hf.py", "--config", TINY_CONFIG, "--distributed_ckpt_path", run["root"],
                   "--tokenizer", TOKENIZER, "--output_dir", out)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["normalize_reward"] is True
    model_config = load_config(str(TINY_CONFIG)).model.model_config
    with pytest.raises(OutputExistsError):  # never over an earlier export without --overwrite
        export_checkpoint(str(run["checkpoint"]), model_config, str(out), str(TOKENIZER))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("num_labels", "pad_token_id", "eos_token_id", "bos_token_id", "vocab_size",
                                   "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                                   "tie_word_embeddings", "torch_dtype")} == {
        "num_labels": 1, "pad_token_id": PAD, "eos_token_id": 2, "bos_token_id": 1, "vocab_size": 32000,
        "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
    assert (config["normalize_reward"], config["mean"], config["std"]) == (True, run["stats"]["mean"],
                                                                           run["stats"]["std"])
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["pad_token"] == "</s>" and tok_config["add_bos_token"] is False

    from transformers import AutoConfig  # no torch needed for the config

    assert AutoConfig.from_pretrained(str(out)).num_labels == 1

    original = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(run["checkpoint"])).items()}
    exported = load_file(str(out / "model.safetensors"))
    assert exported["score.weight"].shape == (1, 64)
    assert set(exported) == {ms_to_hf_name(k) for k in original if k.startswith(("model.", "v_head."))}
    for name, array in original.items():
        if name.startswith(("model.", "v_head.")):
            assert np.array_equal(exported[ms_to_hf_name(name)], array), name

    # HF -> ours (scripts/convert_weight.py) -> HF: identical tensors
    back = run["work"] / "roundtrip.ckpt"
    run_cli(SCRIPTS / "convert_weight.py", "--input_path", out, "--output_path", back, "--config", TINY_CONFIG)
    converted = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(back)).items()}
    assert set(converted) == {k for k in original if k.startswith(("model.", "v_head."))}
    again = run["work"] / "hf_again"
    export_checkpoint(str(back), model_config, str(again), str(TOKENIZER), log=lambda *_: None)
    second = load_file(str(again / "model.safetensors"))
    assert set(second) == set(exported)
    for name, array in exported.items():
        assert array.dtype == second[name].dtype and np.array_equal(array, second[name]), name
