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

import numpy as np
import pytest

from conftest import EXAMPLES, SCRIPTS, TINY_CONFIG, TOKENIZER, cli_env, free_port, run_cli

pytestmark = pytest.mark.slow  # needs the trained_run fixture
SERVER = EXAMPLES / "reward_server.py"
KEY = "test-key-3f9c1a7e5d"  # passed through the environment, never on a command line
PAD = 2


# -- helpers -------------------------------------------------------------------------------------------------
class ServerProcess:
    """reward_server.py on a free 127.0.0.1 port, its output in a log file; ready when /health answers."""

    def __init__(self, log_path, root, *args, env=None):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, str(SERVER), "--config", str(TINY_CONFIG), "--distributed_ckpt_path", str(root),
             "--tokenizer", str(TOKENIZER), "--port", str(self.port), *[str(a) for a in args]],
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
    request_timeout must stay well under the time of 512 one-text passes (about 1 s here with the compiled
    kernels; 1 s was enough before them), or the scoring-timeout check below cannot fail a request."""
    proc = ServerProcess(run["work"] / "guarded.log", run["root"], "--max_batch", 1, "--warmup",
                         "--max_body_bytes", 524288, "--max_texts", 128, "--max_chars", 4000, "--max_in_flight", 4,
                         "--request_timeout", 0.3, env={"MINDRLHF_API_KEY": KEY})
    yield proc
    proc.stop()


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
    assert guarded.post("/score", good, key=KEY)[0] == 200
    assert guarded.get("/health")[0] == 200  # health needs no key
    log = guarded.read_log()
    assert log.count("401 POST") == 3 and "no Authorization header" in log and "wrong key" in log
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


def test_each_limit_answers_and_the_next_request_is_served(guarded, run):
    good = {"prompt": "你好", "response": "你好！"}
    long_text = run["rows"][-1]["response"][:1000]  # over 256 tokens; 128 of them fit max_body_bytes

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
    # request_timeout while scoring: 4 requests of 128 long texts, one forward pass per text (512 passes of
    # about 2 ms), 0.3 s to answer each
    answers = in_parallel(lambda: guarded.post("/get_reward", {"query": [long_text] * 128}, key=KEY),
                          [()] * 4)
    timed_out = [a for a in answers if a[0] == 503]
    assert timed_out and all(a[1]["limit"] == "request_timeout" and a[2].get("retry-after") for a in timed_out)
    assert all(a[0] in (200, 503) for a in answers)
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
    from mindrlhf.models.export import export_checkpoint, ms_to_hf_name
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
