"""The reward server's HTTP side: four contracts through one batcher, `GET /health`; a shared key, size limits,
a bound on requests in flight and a per-request timeout.

- OpenRLHF (openrlhf/utils/agent.py, cli/serve_rm.py): `POST /get_reward` `{"query": [full texts], "prompts",
  "labels"}` -> `{"rewards": [...], "scores": [...]}` (it reads `scores`, else `rewards`).
- vLLM's pooling API, as verl's reward loop calls a discriminative reward model on its vLLM engine: `POST /classify`
  (and `/v1/classify`) `{"model", "input": text or [texts], "use_activation" (or the older "activation"),
  "add_special_tokens"}` -> `{"id", "object": "list", "created", "model", "data": [{"index", "label", "probs":
  [reward], "num_classes": 1}], "usage"}`; with the activation on (vLLM's default) probs are sigmoid(reward); verl
  sends `use_activation: false` and reads the reward.
- SGLang's embeddings API, as verl calls a reward model on its SGLang engine: `POST /v1/embeddings` `{"model",
  "input": text or [texts]}` -> OpenAI's `{"object": "list", "data": [{"object": "embedding", "index",
  "embedding": [reward]}], "model", "usage"}`.
- LLaMA-Factory's API: `POST /v1/score/evaluation` `{"model", "messages": [full texts], "max_length"}` ->
  `{"id", "object": "score.evaluation", "model", "scores": [...]}`.
- `POST /score` `{"prompt", "response"}` or `{"items": [...]}`: rendered with the run's template here.
Full texts are normalised first (mindrlhf.data.templates.FullTextNormaliser: BOS/EOS a decode wrote as text, or a
BOS a client stripped -> the ids the run's template gives), so the decoded rollout of a policy whose prompt format
is the run's template scores as reward_infer.py scores the plain (prompt, response).

Every rejection and every failure is a JSON `{"error", "limit"}` with a 4xx/5xx and never touches the process: the
next request is served; a forward pass that fails answers only the request that caused it (500 `scoring`, see
batcher.py); a reward that is NaN or infinite is never sent as a number (500 `non_finite`).

Memory: a request holds its body until one of ENCODE_THREADS threads has parsed and encoded it, and from then on
only its token ids, int32 in one block, cut to seq_length (docs/serving.md gives the bound, bench_server.py
measures it).
Nothing in a request reaches the file system or a shell: the checkpoint, config, tokenizer and template are fixed
when the service starts, a request only carries texts.
"""
import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mindrlhf.errors import ConfigError

LOG = logging.getLogger("mindrlhf.serving")
DRAIN_CAP = 8 << 20  # a rejected request's body is read (and dropped) up to this size, so the answer arrives
INLINE_BODY_BYTES = 16384  # smaller bodies are parsed and tokenized on the event loop, larger ones on a thread
ENCODE_THREADS = 2  # threads parsing and tokenizing large bodies: how many hold a parsed payload at once
PATH_FIELDS = ("checkpoint", "adapter", "config", "tokenizer")  # what /health shows only by name beyond loopback without the key


@dataclass
class Limits:
    """What one request, and all of them together, may take. Each is named in the answer that enforces it."""

    max_body_bytes: int = 4 << 20
    max_texts: int = 256
    max_chars: int = 32768
    max_in_flight: int = 512  # OpenRLHF retries a 503 only 5 times 1 s apart: requests wait here instead
    request_timeout: float = 120.0

    def check(self):
        for name, value in asdict(self).items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--{name} must be a finite positive number, got {value}")
        return self


class Rejected(Exception):
    """An answer other than 200: status, the limit or rule that decided it, a reason, extra headers."""

    def __init__(self, status: int, limit: str, reason: str, headers: Optional[dict] = None):
        super().__init__(reason)
        self.status, self.limit, self.reason, self.headers = status, limit, reason, headers or {}


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:
        raise Rejected(400, "json", f"malformed JSON: {str(err)[:200]}") from None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a name or any other address is reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _string(value, where: str, limits: Limits) -> str:
    if not isinstance(value, str):
        raise Rejected(400, "field_type", f"{where} must be a string, got {type(value).__name__}")
    if len(value) > limits.max_chars:
        raise Rejected(413, "max_chars", f"{where} has {len(value)} characters, over max_chars={limits.max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # "\ud800" is valid JSON but no text: no tokenizer can encode it
        raise Rejected(400, "encoding", f"{where} is not valid Unicode: {err.reason} at character {err.start} "
                                        f"({value[err.start:err.end].encode('utf-8', 'backslashreplace')!r})") from None
    return value


def _list(payload, field: str, what: str, limits: Limits) -> list:
    if not isinstance(payload, dict):
        raise Rejected(400, "body", f"the body must be a JSON object, got {type(payload).__name__}")
    if field not in payload:
        raise Rejected(400, "missing_field", f"missing field '{field}' ({what})")
    values = payload[field]
    if not isinstance(values, list):
        raise Rejected(400, "field_type", f"field '{field}' must be a list ({what}), got {type(values).__name__}")
    if not values:
        raise Rejected(400, "empty", f"field '{field}' is an empty list: nothing to score")
    if len(values) > limits.max_texts:
        raise Rejected(413, "max_texts", f"field '{field}' has {len(values)} entries, over max_texts="
                                         f"{limits.max_texts}")
    return values


def query_texts(payload, limits: Limits, field: str = "query") -> List[str]:
    """OpenRLHF's /get_reward body (or LLaMA-Factory's `messages`) -> its full texts (prompts and labels, when
    sent, are not needed)."""
    values = _list(payload, field, "full texts: prompt and response in the run's template", limits)
    return [_string(v, f"{field}[{i}]", limits) for i, v in enumerate(values)]


def _optional(payload: dict, field: str, kinds: tuple, what: str, limits: Limits):
    """An optional field of these types; a string is checked as any text is (it may be echoed back)."""
    value = payload.get(field)
    if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        raise Rejected(400, "field_type", f"field '{field}' must be {what}, got {type(value).__name__}")
    return _string(value, field, limits) if isinstance(value, str) else value


def input_request(payload, limits: Limits) -> Tuple[List[str], dict]:
    """vLLM's /classify or SGLang's /v1/embeddings body -> (texts, options): `input` a text or a list of texts;
    `model`, `use_activation` (vLLM >= 0.11.2) or `activation` (before), `add_special_tokens` optional (the run's
    template decides the special tokens: see FullTextNormaliser)."""
    if isinstance(payload, dict) and isinstance(payload.get("input"), str):
        payload = dict(payload, input=[payload["input"]])
    texts = query_texts(payload, limits, "input")
    flags = {name: _optional(payload, name, (bool,), "true or false", limits)
             for name in ("use_activation", "activation", "add_special_tokens")}
    if None not in (flags["use_activation"], flags["activation"]) and flags["use_activation"] != flags["activation"]:
        raise Rejected(400, "conflict", f"'use_activation' is {str(flags['use_activation']).lower()} and "
                                        f"'activation' is {str(flags['activation']).lower()}: send one of them")
    activation = flags["activation"] if flags["use_activation"] is None else flags["use_activation"]
    return texts, {"model": _optional(payload, "model", (str,), "a string", limits),
                   "activation": activation is not False}  # vLLM applies its activation unless told not to


def evaluation_request(payload, limits: Limits) -> Tuple[List[str], dict]:
    """LLaMA-Factory's /v1/score/evaluation body -> (texts, options): `messages` full texts, `model`, and
    `max_length` (tokens kept per text; at most seq_length)."""
    texts = query_texts(payload, limits, "messages")
    max_length = _optional(payload, "max_length", (int,), "a positive integer", limits)
    if max_length is not None and max_length < 1:
        raise Rejected(400, "field_type", f"field 'max_length' must be a positive integer, got {max_length}")
    return texts, {"model": _optional(payload, "model", (str,), "a string", limits), "max_length": max_length}


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for any finite x (e^-x is never taken for a large negative x)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def score_items(payload, limits: Limits) -> List[Tuple[str, str]]:
    """/score body: one {"prompt", "response"} object, or {"items": [{"prompt", "response"}, ...]}."""
    if isinstance(payload, dict) and "items" not in payload and ("prompt" in payload or "response" in payload):
        payload = {"items": [payload]}
    values = _list(payload, "items", 'objects with "prompt" and "response"', limits)
    items = []
    for i, item in enumerate(values):
        if not isinstance(item, dict):
            raise Rejected(400, "field_type", f"items[{i}] must be an object with prompt and response, got "
                                              f"{type(item).__name__}")
        for key in ("prompt", "response"):
            if key not in item:
                raise Rejected(400, "missing_field", f"items[{i}] has no field '{key}'")
        items.append((_string(item["prompt"], f"items[{i}].prompt", limits),
                      _string(item["response"], f"items[{i}].response", limits)))
    return items


class RewardService:  # pylint: disable=too-many-instance-attributes
    """Texts -> rewards through the batcher, with the run's template, truncation and (optionally) normalisation.

    Everything here is decided at start; requests bring only texts.
    """

    def __init__(self, scorer, tokenizer, template, batcher, limits: Limits, api_key: Optional[str] = None,
                 stats: Optional[dict] = None, info: Optional[dict] = None):
        from mindrlhf.data.templates import FullTextNormaliser

        self.scorer, self.tokenizer, self.template, self.batcher = scorer, tokenizer, template, batcher
        self.full_text_normaliser = FullTextNormaliser.build(template, tokenizer)
        self.encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="reward-encode")
        self.vocab_size = int(scorer.model_config.vocab_size)
        self.limits = limits.check()
        self._key = api_key.encode("utf-8") if api_key else None
        self.stats = stats
        self.info = dict(info or {})
        self.in_flight = 0
        self.counts = {"answered": 0, "rejected": 0, "non_finite": 0}

    # -- scoring ---------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], full_texts: bool = False,
               cut: Optional[int] = None) -> List[np.ndarray]:
        """Token ids exactly as reward_infer.py makes them for the rendered text (same special-token rule), as
        int32 arrays (a Python int list costs 9x more), the first `cut` of each when given; full texts from a
        client are normalised to the template's rendering first."""
        return self._encode(texts, full_texts, cut)[0]

    def _encode(self, texts: Sequence[str], full_texts: bool, cut: Optional[int]):
        if full_texts:
            texts = [self.full_text_normaliser(t) for t in texts]
        lists = self.tokenizer.encode(list(texts), special_tokens=self.template.special_tokens)
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))  # no int objects left behind in the heap
        kept = np.minimum(lengths, cut) if cut is not None else lengths
        # one block for all of them (views into it): freed at once, never scattered between other allocations
        flat = np.fromiter(itertools.chain.from_iterable(x[:cut] for x in lists), np.int32, int(kept.sum()))
        del lists
        return np.split(flat, np.cumsum(kept)[:-1]), lengths

    def check_ids(self, ids: List[np.ndarray], field: str):
        """Every id inside the model's vocabulary before a pass (a tokenizer with more tokens than the model's
        embedding would otherwise read past it)."""
        for i, seq in enumerate(ids):
            if not len(seq):
                raise Rejected(400, "empty_text", f"{field}[{i}] has no tokens: nothing to score")
            low, high = int(seq.min()), int(seq.max())
            if low < 0 or high >= self.vocab_size:
                raise Rejected(422, "vocab", f"{field}[{i}] tokenizes to id {high if high >= self.vocab_size else low}"
                                             f", outside the model's vocabulary of {self.vocab_size}: the tokenizer "
                                             "does not belong to this model")

    def token_ids(self, texts: List[str], full_texts: bool, field: str,
                  max_tokens: Optional[int] = None) -> Tuple[List[np.ndarray], np.ndarray]:
        """(ids cut to seq_length as training and reward_infer.py cut them, each text's token count). Empties
        `texts`: from here on only the ids are held (and no Python ints: they would pin freed heap)."""
        seq_length = min(self.scorer.seq_length, max_tokens or self.scorer.seq_length)
        try:  # cut before the arrays are made: the tokenizer's whole output is never copied
            ids, lengths = self._encode(texts, full_texts, seq_length)
        except Exception as err:  # pylint: disable=broad-except  (the tokenizer's own error, answered as a 400)
            raise Rejected(400, "encoding", f"field '{field}': the tokenizer cannot encode it: "
                                            f"{type(err).__name__}: {str(err)[:200]}") from None
        finally:
            texts.clear()
        self.check_ids(ids, field)
        return ids, lengths

    def prepare(self, body: bytes, kind: str) -> Tuple[List[np.ndarray], np.ndarray, dict, str]:
        """A request's body -> (token ids, token counts, options, field): parsed, checked, encoded. The parsed
        payload and texts live only inside this call."""
        payload = parse_json(body)
        options, field, full = {}, "query", True
        if kind == "get_reward":
            texts = query_texts(payload, self.limits)
        elif kind in ("classify", "embeddings"):
            (texts, options), field = input_request(payload, self.limits), "input"
        elif kind == "evaluation":
            (texts, options), field = evaluation_request(payload, self.limits), "messages"
        else:
            texts, field, full = [self.template.render(p, r) for p, r in score_items(payload, self.limits)], "items", \
                False
        del payload
        ids, lengths = self.token_ids(texts, full, field, options.get("max_length"))
        return ids, lengths, options, field

    async def rewards(self, texts: List[str], full_texts: bool = False, field: str = "query",
                      max_tokens: Optional[int] = None) -> dict:
        """Rewards of these texts (the list is emptied once they are encoded)."""
        ids, lengths = self.token_ids(texts, full_texts, field, max_tokens)
        return await self.score(ids, lengths, field, max_tokens)

    async def score(self, ids: List[np.ndarray], lengths: np.ndarray, field: str,
                    max_tokens: Optional[int] = None) -> dict:
        """Rewards of encoded texts, through the batcher; the ids list is emptied once the batcher has them."""
        seq_length = min(self.scorer.seq_length, max_tokens or self.scorer.seq_length)
        truncated = np.flatnonzero(lengths > seq_length).tolist()
        if not self.batcher.thread.is_alive():
            raise Rejected(503, "batcher", "the scoring thread has stopped (see the server log); nothing can be "
                                           "scored until the server is restarted")
        job = self.batcher.submit(list(ids))
        ids.clear()
        try:
            raw = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # request_timeout: the batcher skips what is left of this job
            job.abandoned = True
            raise
        except Exception as err:  # pylint: disable=broad-except  (this request's pass failed; the others got theirs)
            raise Rejected(500, "scoring", f"scoring this request failed, also alone: {type(err).__name__}: "
                                           f"{str(err)[:300]}; requests batched with it were scored without it "
                                           "(GET /health counts failed_passes: passes where every request failed, "
                                           "i.e. the model itself)") from None
        bad = [i for i, r in enumerate(raw) if not math.isfinite(float(r))]
        if bad:
            self.counts["non_finite"] += 1
            LOG.error("the model gave non-finite rewards for %s[%s]: %s", field, bad,
                      [float(raw[i]) for i in bad[:8]])
            raise Rejected(500, "non_finite", f"the model gave a non-finite reward for {field}{bad[:16]} "
                                              f"({', '.join(str(float(raw[i])) for i in bad[:4])}): not a score; the "
                                              "weights or the input are broken (see GET /health)")
        answer = {"rewards": [float(r) for r in raw], "num_tokens": lengths.tolist(), "truncated": truncated}
        if truncated:
            answer["note"] = (f"{len(truncated)} text(s) longer than seq_length={seq_length} tokens were truncated "
                              "to their first seq_length tokens, as in training")
        if self.stats is not None:
            from mindrlhf.evaluation.normalize import normalize

            answer["raw_rewards"] = answer["rewards"]
            answer["rewards"] = [float(r) for r in normalize(raw, self.stats)]
            answer["normalized"] = True
        return answer

    # -- HTTP ------------------------------------------------------------------------------------------------
    def check_key(self, request, peer: str):
        """Bearer key in constant time; the log names the peer and the reason, never a key."""
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            reason = "no Authorization header"
        elif header.partition(" ")[0].lower() != "bearer":
            reason = "Authorization is not a Bearer key"
        elif not self._key_matches(request):
            reason = "wrong key"
        else:
            return
        LOG.warning("401 %s %s from %s: %s", request.method, request.url.path, peer, reason)
        raise Rejected(401, "api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            raise Rejected(413, "max_body_bytes", f"request body of {declared} bytes is over max_body_bytes="
                                                  f"{self.limits.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise Rejected(413, "max_body_bytes", f"request body over max_body_bytes="
                                                      f"{self.limits.max_body_bytes}")
            chunks.append(chunk)
        request.state.body_read = True
        return b"".join(chunks)

    async def answer(self, request, kind: str) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout
        try:
            body = await asyncio.wait_for(self.read_body(request), self.limits.request_timeout)
        except asyncio.TimeoutError:
            raise Rejected(408, "request_timeout", f"request body not received within request_timeout="
                                                   f"{self.limits.request_timeout}s") from None
        # parsing and encoding a large body runs on ENCODE_THREADS threads: the requests waiting for them hold
        # only their body, and at most ENCODE_THREADS hold a parsed payload and a tokenizer's output at once
        if len(body) <= INLINE_BODY_BYTES:  # a thread hand-off costs more than this
            ids, lengths, options, field = self.prepare(body, kind)
        else:
            ids, lengths, options, field = await loop.run_in_executor(self.encoder, self.prepare, body, kind)
        del body
        try:
            answer = await asyncio.wait_for(self.score(ids, lengths, field, options.get("max_length")),
                                            max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise Rejected(503, "request_timeout", f"not scored within request_timeout="
                                                   f"{self.limits.request_timeout}s; the server is busy, retry later",
                           {"Retry-After": "1"}) from None
        if kind == "get_reward":
            answer["scores"] = answer["rewards"]  # newer OpenRLHF servers send both; its client reads scores first
        elif kind == "classify":
            answer = self.classify_answer(answer, options)
        elif kind == "embeddings":
            answer = self.embeddings_answer(answer, options)
        elif kind == "evaluation":
            answer = {"id": f"scoreval-{uuid.uuid4().hex}", "object": "score.evaluation",
                      "model": options["model"] or self.model_name, "scores": answer["rewards"]}
        return answer

    @property
    def model_name(self) -> str:
        return str(self.info.get("model") or "mindrlhf-reward-model")

    def _tokens(self, answer: dict) -> int:
        return sum(min(n, self.scorer.seq_length) for n in answer["num_tokens"])

    def classify_answer(self, answer: dict, options: dict) -> dict:
        """vLLM's ClassificationResponse: one class, probs = [reward], or [sigmoid(reward)] with activation."""
        tokens = self._tokens(answer)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": options.get("model") or self.model_name,
                "data": [{"index": i, "label": "LABEL_0", "probs": [sigmoid(r) if options["activation"] else r],
                          "num_classes": 1} for i, r in enumerate(answer["rewards"])],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    def embeddings_answer(self, answer: dict, options: dict) -> dict:
        """OpenAI's embeddings response, as SGLang answers it for a reward model: embedding = [reward]."""
        tokens = self._tokens(answer)
        return {"object": "list", "model": options.get("model") or self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": [r]}
                         for i, r in enumerate(answer["rewards"])],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def handle(self, request, kind: str):
        from fastapi.responses import JSONResponse

        peer = f"{request.client.host}:{request.client.port}" if request.client else "unknown peer"
        try:
            self.check_key(request, peer)
            if self.in_flight >= self.limits.max_in_flight:
                raise Rejected(503, "max_in_flight", f"{self.in_flight} requests in flight, the limit max_in_flight="
                                                     f"{self.limits.max_in_flight}; retry later", {"Retry-After": "1"})
            self.in_flight += 1
            try:
                response = JSONResponse(await self.answer(request, kind))  # rendered here: an error is answered
            except Rejected:
                raise
            except Exception as err:  # pylint: disable=broad-except  (a JSON answer naming it, never a bare 500)
                LOG.exception("500 %s %s from %s", request.method, request.url.path, peer)
                raise Rejected(500, "internal", f"internal error: {type(err).__name__}: {str(err)[:200]}") from None
            finally:
                self.in_flight -= 1
        except Rejected as err:
            self.counts["rejected"] += 1
            if err.status != 401:
                LOG.info("%d %s %s from %s: %s", err.status, request.method, request.url.path, peer, err.reason)
            if err.limit != "request_timeout":
                await drain(request)
            return JSONResponse({"error": err.reason, "limit": err.limit}, status_code=err.status,
                                headers=err.headers)
        self.counts["answered"] += 1
        return response

    def trusted(self, request) -> bool:
        """Callers with the key may see file paths; without a key set, loopback callers too (with one, a loopback
        proxy would make every caller look local)."""
        if self._key is None:
            return is_loopback(request.client.host if request.client else "")
        return self._key_matches(request)

    def _key_matches(self, request) -> bool:
        """A Bearer key equal to the server's, compared in constant time (False when the server has none)."""
        if self._key is None:
            return False
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                   self._key)

    def health(self, trusted: bool = True) -> dict:
        """What is served. Beyond loopback without the key: names, step and template only, no absolute paths."""
        info = dict(self.info)
        stats_file = None if self.stats is None else self.stats["path"]
        if not trusted:
            for key in PATH_FIELDS:
                if isinstance(info.get(key), str):
                    info[key] = os.path.basename(info[key])
            template = str(info.get("template", ""))
            info["template"] = os.path.basename(template) if os.path.isabs(template) else template
            stats_file = None if stats_file is None else os.path.basename(stats_file)
        alive = self.batcher.thread.is_alive()
        return dict(info, status="ok" if alive else "batcher_stopped", batcher_alive=alive, in_flight=self.in_flight,
                    counts=dict(self.counts, **self.batcher.counts),
                    normalization=None if self.stats is None else
                    {"mean": self.stats["mean"], "std": self.stats["std"], "stats_file": stats_file},
                    limits=asdict(self.limits), api_key_required=self._key is not None,
                    full_texts=self.full_text_normaliser.describe())


async def drain(request):
    """Read and drop what is left of a rejected request's body (bounded), so the client gets the answer rather
    than a reset connection."""
    from starlette.requests import ClientDisconnect

    if getattr(request.state, "body_read", False):
        return
    size = 0

    async def consume():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_CAP:
                return

    try:
        await asyncio.wait_for(consume(), 2.0)
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):
        pass


def create_app(service: RewardService):
    """The FastAPI application around a service (no docs or OpenAPI routes: nothing else to reach)."""
    from fastapi import FastAPI, Request

    app = FastAPI(title="mindrlhf reward server", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(kind):
        async def endpoint(request: Request):
            return await service.handle(request, kind)
        return endpoint

    # OpenRLHF, the run's own template, vLLM's pooling and SGLang's embeddings APIs (verl), LLaMA-Factory: one
    # batcher, key and limits
    for path, kind in (("/get_reward", "get_reward"), ("/score", "score"), ("/classify", "classify"),
                       ("/v1/classify", "classify"), ("/v1/embeddings", "embeddings"),
                       ("/v1/score/evaluation", "evaluation")):
        app.add_api_route(path, answer(kind), methods=["POST"])

    @app.get("/health")
    async def health(request: Request):
        from fastapi.responses import JSONResponse

        answer = service.health(service.trusted(request))
        return JSONResponse(answer, status_code=200 if answer["batcher_alive"] else 503)

    return app
