"""Starting and stopping the reward server: everything fixed at start, loopback by default, SIGTERM drains.

The checkpoint, config, tokenizer, template and reward statistics are read once here; the listening socket is
opened here too (an address in use is a one-line error, and /health reports the address really bound). On
SIGTERM or Ctrl-C uvicorn stops accepting connections, the requests in flight are answered, the batcher stops,
and the process exits 0.
"""
import logging
import os
import signal
import socket
import sys
from typing import Optional

from mindrlhf.errors import ConfigError
from mindrlhf.serving.app import Limits, RewardService, create_app, is_loopback  # noqa: F401
from mindrlhf.serving.batcher import DynamicBatcher

LOG = logging.getLogger("mindrlhf.serving")
API_KEY_ENV = "MINDRLHF_API_KEY"


def bind_warning(host: str, has_key: bool) -> Optional[str]:
    """The start-up warning for a server reachable beyond this machine without a key (None when there is none)."""
    if is_loopback(host) or has_key:
        return None
    return (f"WARNING: listening on {host}, beyond loopback, with no API key: anyone who can reach this port can "
            f"use the model; set {API_KEY_ENV} (or --api_key) or listen on 127.0.0.1")


def open_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def setup_logging(level: str = "info"):
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def map_large_buffers():
    """glibc only: buffers of 128 KiB and more are always mapped on their own and unmapped when freed (a fixed
    M_MMAP_THRESHOLD; glibc otherwise raises it as large blocks are freed), so a request's body and its
    tokenizer's output go back to the system instead of staying in a heap that cannot shrink below live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its own allocator's rules
        pass


def build_service(config_path: str, ckpt_path: str, tokenizer: str, limits: Limits, max_batch: int = 32,
                  batch_wait_ms: float = 5.0, api_key: Optional[str] = None, normalize: bool = False,
                  template: Optional[str] = None, src_strategy: Optional[str] = None,
                  warmup: bool = False, adapter: Optional[str] = None) -> RewardService:
    """The model, tokenizer, template and statistics behind a service, loaded once; the batcher started."""
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.normalize import load_stats
    from mindrlhf.evaluation.run import run_template
    from mindrlhf.checkpoints.slices import checkpoint_root
    from mindrlhf.evaluation.scorer import RewardScorer, base_file, list_checkpoints
    from mindrlhf.training.config import load_config

    limits.check()
    map_large_buffers()
    if max_batch < 1:
        raise ConfigError(f"--max_batch must be at least 1, got {max_batch}")
    config = load_config(config_path)
    tok = load_tokenizer(tokenizer, num_threads=1)
    chosen = run_template(adapter or ckpt_path, template, tok)
    checkpoint = base_file(ckpt_path, adapter) if adapter else list_checkpoints(ckpt_path)[-1]
    weights = adapter or checkpoint
    stats = load_stats(checkpoint_root(weights), weights) if normalize else None
    scorer = RewardScorer(config, checkpoint, batch_size=max_batch, src_strategy=src_strategy, log=LOG.info,
                          config_name=config_path, adapter=adapter)
    batcher = DynamicBatcher(scorer, max_batch, batch_wait_ms)
    if warmup:
        LOG.info("compiling %d shapes (%s %s x lengths %s)", len(batcher.sizes) * len(scorer.buckets),
                 "packed rows" if batcher.packing else "batch sizes", batcher.sizes, scorer.buckets)
        batcher.warmup()
    info = {"checkpoint": os.path.abspath(checkpoint), "step": scorer.step,
            **({"adapter": os.path.abspath(adapter)} if adapter else {}), "config": os.path.abspath(config_path),
            "tokenizer": os.path.abspath(getattr(tok, "path", tokenizer)), "template": chosen.name,
            "seq_length": scorer.seq_length, "max_batch": max_batch, "batch_wait_ms": batch_wait_ms,
            "buckets": scorer.buckets, "batch_sizes": batcher.sizes, "packing": scorer.packing or False,
            "model": os.path.basename(checkpoint_root(weights)) or "mindrlhf-reward-model"}
    return RewardService(scorer, tok, chosen, batcher.start(), limits, api_key, stats, info)


def _ignore(signum, frame):  # pylint: disable=unused-argument
    """uvicorn re-raises the signal it stopped on once it is done; by then the work is finished."""


def serve(service: RewardService, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info") -> dict:
    """Serve until SIGTERM/SIGINT; in-flight requests are answered before it returns."""
    import uvicorn

    sock = open_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    service.info.update(host=bound_host, port=bound_port)
    warning = bind_warning(bound_host, service.health()["api_key_required"])
    if warning:
        LOG.warning(warning)
    app = create_app(service)
    config = uvicorn.Config(app, log_level=log_level, access_log=True, lifespan="off",
                            timeout_graceful_shutdown=service.limits.request_timeout + 5,
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    LOG.info("reward server listening on http://%s:%d (checkpoint %s, step %s, template %s, normalization %s, "
             "API key %s)", bound_host, bound_port, service.info["checkpoint"], service.info["step"],
             service.info["template"], "on" if service.stats else "off",
             "required" if service.health()["api_key_required"] else "not set")
    try:
        server.run(sockets=[sock])
    finally:
        service.batcher.stop()
    LOG.info("reward server stopped: %s", service.counts)
    return dict(service.counts)


def run(config_path: str, ckpt_path: str, tokenizer: str, host: str = "127.0.0.1", port: int = 5000,
        api_key: Optional[str] = None, log_level: str = "info", limits: Optional[dict] = None, **options) -> dict:
    """reward_server.py: logging, the key (--api_key, else MINDRLHF_API_KEY), the service, then serve.

    options: build_service's (max_batch, batch_wait_ms, normalize, template, src_strategy, warmup).
    """
    setup_logging(log_level)
    if api_key:
        LOG.warning("--api_key is visible in process listings; prefer the environment variable %s", API_KEY_ENV)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    service = build_service(config_path, ckpt_path, tokenizer, Limits(**(limits or {})), api_key=key, **options)
    return serve(service, host, port, log_level)
