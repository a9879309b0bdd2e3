#!/usr/bin/env bash
# Launch with MindSpore's msrun (the modern launcher; no rank table needed).
#
#   bash scripts/msrun_launcher.sh "SCRIPT.py ARGS" [WORKER_NUM] [MASTER_PORT] [LOG_DIR] [LOCAL_WORKER_NUM]
#   bash scripts/msrun_launcher.sh "examples/reward_model_train_tutorial/reward_train.py \
#        --config model_configs/llama2_config/run_llama_2_tiny_rm_cpu.yaml --train_dataset train.mindrecord \
#        --use_parallel True" 2
#
# Defaults: WORKER_NUM 8, MASTER_PORT 8118, LOG_DIR output/msrun_log, LOCAL_WORKER_NUM = WORKER_NUM (one node).
# msrun starts `python` from PATH in every worker, so this puts the project's .venv first on PATH when it exists.
# Waits for all workers (--join) and exits non-zero when any fails; worker logs are LOG_DIR/worker_N.log.
set -eu

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 1 ] && [ $# -le 5 ] || usage
EXECUTE_ORDER=$1
WORKER_NUM=${2:-8}
MASTER_PORT=${3:-8118}
LOG_DIR=${4:-output/msrun_log}
LOCAL_WORKER_NUM=${5:-$WORKER_NUM}
for value in "$WORKER_NUM" "$MASTER_PORT" "$LOCAL_WORKER_NUM"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: '$value' is not a number" >&2; usage; }
done
[ -n "$EXECUTE_ORDER" ] || usage

PROJECT=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$PROJECT/.venv/bin/python" ]; then
  export PATH="$PROJECT/.venv/bin:$PATH"
fi
export PYTHONPATH="$PROJECT${PYTHONPATH:+:$PYTHONPATH}"
command -v msrun >/dev/null || { echo "error: msrun not found (it ships with mindspore)" >&2; exit 2; }

# shellcheck disable=SC2086  # EXECUTE_ORDER is a script path followed by its arguments
exec msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" --master_port="$MASTER_PORT" \
  --log_dir="$LOG_DIR" --join=True --cluster_time_out=600 $EXECUTE_ORDER
