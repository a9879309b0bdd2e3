#!/usr/bin/env bash
# Launch with MindSpore's msrun (the modern launcher; no rank table needed), on one node or several.
#
# One node:
#   bash scripts/msrun_launcher.sh "SCRIPT.py ARGS" [WORKER_NUM] [MASTER_PORT] [LOG_DIR] [LOCAL_WORKER_NUM]
# Several nodes (MindFormers' own argument order; run the same line on every node, NODE_RANK 0 first):
#   bash scripts/msrun_launcher.sh "SCRIPT.py ARGS" WORKER_NUM LOCAL_WORKER_NUM MASTER_ADDR MASTER_PORT NODE_RANK \
#        [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]
#   e.g. 2 nodes x 8 NPUs, node 0 at 192.168.1.10:
#     node 0: bash scripts/msrun_launcher.sh "reward_train.py ... --use_parallel True" 16 8 192.168.1.10 8118 0
#     node 1: bash scripts/msrun_launcher.sh "reward_train.py ... --use_parallel True" 16 8 192.168.1.10 8118 1
#
# Defaults: WORKER_NUM 8, MASTER_PORT 8118, LOG_DIR output/msrun_log, LOCAL_WORKER_NUM = WORKER_NUM (one node),
# MASTER_ADDR 127.0.0.1, NODE_RANK 0, JOIN True, CLUSTER_TIME_OUT 600 s.
# msrun starts `python` from PATH in every worker, so this puts the project's .venv first on PATH when it exists.
# With JOIN True it waits for this node's workers and exits non-zero when any fails, 75 when every worker here
# stopped with a checkpoint (SIGTERM to the workers or reward_train.py's --stop_file; docs/tutorial.md); worker logs are
# LOG_DIR/worker_N.log (N is the global rank), msrun's own LOG_DIR/scheduler.log on node 0.
set -eu

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

EXECUTE_ORDER=${1:-}
[ -n "$EXECUTE_ORDER" ] || usage
MASTER_ADDR=127.0.0.1
NODE_RANK=0
JOIN=True
CLUSTER_TIME_OUT=600
case $# in
  1|2|3|4|5)
    WORKER_NUM=${2:-8}
    MASTER_PORT=${3:-8118}
    LOG_DIR=${4:-output/msrun_log}
    LOCAL_WORKER_NUM=${5:-$WORKER_NUM}
    ;;
  6|7|8|9)
    WORKER_NUM=$2
    LOCAL_WORKER_NUM=$3
    MASTER_ADDR=$4
    MASTER_PORT=$5
    NODE_RANK=$6
    LOG_DIR=${7:-output/msrun_log}
    JOIN=${8:-True}
    CLUSTER_TIME_OUT=${9:-600}
    ;;
  *) usage ;;
esac
for value in "$WORKER_NUM" "$MASTER_PORT" "$LOCAL_WORKER_NUM" "$NODE_RANK" "$CLUSTER_TIME_OUT"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: '$value' is not a number" >&2; usage; }
done
if [ "$LOCAL_WORKER_NUM" -gt "$WORKER_NUM" ] || [ "$LOCAL_WORKER_NUM" -lt 1 ]; then
  echo "error: LOCAL_WORKER_NUM $LOCAL_WORKER_NUM must be between 1 and WORKER_NUM $WORKER_NUM" >&2
  exit 2
fi
NODES=$(( (WORKER_NUM + LOCAL_WORKER_NUM - 1) / LOCAL_WORKER_NUM ))
if [ "$NODE_RANK" -ge "$NODES" ]; then
  echo "error: NODE_RANK $NODE_RANK is out of range: $WORKER_NUM workers / $LOCAL_WORKER_NUM per node = $NODES node(s)" >&2
  exit 2
fi
case $JOIN in True|False) ;; *) echo "error: JOIN must be True or False, got '$JOIN'" >&2; exit 2 ;; esac

PROJECT=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$PROJECT/.venv/bin/python" ]; then
  export PATH="$PROJECT/.venv/bin:$PATH"
fi
export PYTHONPATH="$PROJECT${PYTHONPATH:+:$PYTHONPATH}"
command -v msrun >/dev/null || { echo "error: msrun not found (it ships with mindspore)" >&2; exit 2; }

echo "msrun: node $NODE_RANK of $NODES, $LOCAL_WORKER_NUM of $WORKER_NUM workers here, master $MASTER_ADDR:$MASTER_PORT, logs $LOG_DIR" >&2
# msrun exports only the job's MS_WORKER_NUM; the ranks on this host share its cores (mindrlhf.distributed)
export LOCAL_RANK_SIZE=$LOCAL_WORKER_NUM
# shellcheck disable=SC2086  # EXECUTE_ORDER is a script path followed by its arguments
status=0
msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join="$JOIN" \
  --cluster_time_out="$CLUSTER_TIME_OUT" $EXECUTE_ORDER || status=$?
# Workers stopped on SIGTERM/SIGINT/--stop_file exit 75 after saving (msrun reports any non-zero exit as a
# failure): when every worker of this node logged its stop, this node exits 75 too (run it again with --resume).
if [ "$status" -ne 0 ] && [ "$JOIN" = True ]; then
  stopped=$(grep -l "^stopped after step" "$LOG_DIR"/worker_*.log 2>/dev/null | wc -l)
  if [ "$stopped" -eq "$LOCAL_WORKER_NUM" ]; then
    echo "msrun: every worker here stopped with a checkpoint; run the same launch with --resume to continue" >&2
    exit 75
  fi
fi
exit "$status"
