"""Serve a trained reward model over HTTP, with the contracts RL frameworks call a reward model with.

    MINDRLHF_API_KEY=... python reward_server.py --config run_llama_2_7b_rm.yaml \
        --distributed_ckpt_path output/checkpoint --tokenizer /path/to/tokenizer.model [--normalize]
POST /get_reward {"query": [full texts]} -> {"rewards", "scores"}   (OpenRLHF's --reward.remote_url)
POST /classify {"input": text(s), "use_activation": false} -> {"data": [{"probs": [reward]}]}  (vLLM's: verl)
POST /v1/embeddings {"input": text(s)} -> {"data": [{"embedding": [reward]}]}  (SGLang's: verl)
POST /v1/score/evaluation {"messages": [full texts]} -> {"scores"}     (LLaMA-Factory's)
POST /score {"prompt", "response"} or {"items": [...]}       (rendered with the run's template)
GET /health: checkpoint, step, config, template, normalisation, limits, counts, whether the batcher runs (paths only
for a caller with the key, or on loopback when no key is set).
Full texts are normalised to the run's template first (BOS/EOS an RL loop's decode wrote as text), so the policy's
prompt format must be the reward model's template.
Listens on 127.0.0.1 unless --host says otherwise. SIGTERM answers the requests in flight, then exits 0.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import add_adapter_arg, add_run_args, main_guard  # noqa: E402
from mindrlhf.serving.app import Limits  # noqa: E402

LIMITS = {"max_body_bytes": "largest request body in bytes (413 beyond)",
          "max_texts": "texts per request (413 beyond)",
          "max_chars": "characters per text (413 beyond)",
          "max_in_flight": "requests being handled at once (503 with Retry-After beyond)",
          "request_timeout": "seconds to receive and score one request (408/503 beyond)"}


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback only; beyond it, set an API key)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--api_key", default=None,
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health; prefer the "
                             "environment variable MINDRLHF_API_KEY, which process listings do not show")
    parser.add_argument("--normalize", action="store_true",
                        help="rewards = (raw - mean) / std with <checkpoint root>/reward_stats.json "
                             "(reward_eval.py --save_stats); answers also carry raw_rewards")
    parser.add_argument("--template", default=None, help="as reward_infer.py: default the run's recorded template")
    parser.add_argument("--src_strategy", default=None, help="strategy file of a model-parallel run (as reward_infer)")
    add_adapter_arg(parser)
    parser.add_argument("--max_batch", type=int, default=32,
                        help="sequences per forward pass; 1 scores each text alone (no dynamic batching)")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0,
                        help="how long an idle server waits for more requests to join a batch")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every batch shape at start instead of on first use (slower start)")
    for name, what in LIMITS.items():
        value = getattr(Limits, name)
        parser.add_argument(f"--{name}", type=type(value), default=value, help=f"{what} (default {value})")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.serving.server import run

    run(args.config, args.distributed_ckpt_path, args.tokenizer, args.host, args.port, args.api_key, args.log_level,
        limits={name: getattr(args, name) for name in LIMITS}, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, normalize=args.normalize, template=args.template,
        src_strategy=args.src_strategy, warmup=args.warmup, adapter=args.adapter)


if __name__ == "__main__":
    main()
