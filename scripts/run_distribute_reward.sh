#!/usr/bin/env bash
# Launch one process per Ascend device with an HCCL rank table (the tutorial's run_distribute_reward.sh).
#
#   bash scripts/run_distribute_reward.sh [--detach] "EXECUTE_ORDER" RANK_TABLE_FILE DEVICE_RANGE RANK_SIZE
#   bash scripts/run_distribute_reward.sh "python reward_train.py --config run_llama_2_7b_rm.yaml \
#        --train_dataset train.mindrecord" hccl_8p_01234567_127.0.0.1.json [0,8] 8
#
# Each rank runs EXECUTE_ORDER with RANK_TABLE_FILE, DEVICE_ID, RANK_ID and RANK_SIZE set (and LOCAL_RANK_SIZE,
# the ranks on this host, which share its cores), writing its output
# to $OUTPUT_DIR/log/rank_N/mindformer.log (OUTPUT_DIR defaults to ./output). DEVICE_RANGE [a,b] or [a,b) means
# devices a..b-1. RANK_START (default 0) offsets rank ids on the second and later node of a multi-node run.
# Unlike the upstream script it waits for every rank: when one fails (or on Ctrl-C) it stops the others and
# exits non-zero, naming the failed ranks and their logs. --detach keeps the old start-and-return behaviour.
set -u

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DETACH=0
if [ "${1:-}" = "--detach" ]; then DETACH=1; shift; fi
[ $# -eq 4 ] || { echo "error: expected 4 arguments, got $#" >&2; usage; }
EXECUTE_ORDER=$1
RANK_TABLE=$2
DEVICE_RANGE=$3
RANK_SIZE_ARG=$4

[ -n "$EXECUTE_ORDER" ] || { echo "error: EXECUTE_ORDER is empty" >&2; usage; }
[ -f "$RANK_TABLE" ] || { echo "error: rank table '$RANK_TABLE' does not exist" >&2; usage; }
RANK_TABLE=$(cd "$(dirname "$RANK_TABLE")" && pwd)/$(basename "$RANK_TABLE")
if [[ ! "$DEVICE_RANGE" =~ ^\[([0-9]+),([0-9]+)[]\)]$ ]]; then
  echo "error: DEVICE_RANGE must look like [0,8], got '$DEVICE_RANGE'" >&2; usage
fi
START=${BASH_REMATCH[1]}
END=${BASH_REMATCH[2]}
[ "$START" -lt "$END" ] || { echo "error: DEVICE_RANGE start must be below its end: '$DEVICE_RANGE'" >&2; usage; }
[[ "$RANK_SIZE_ARG" =~ ^[0-9]+$ ]] || { echo "error: RANK_SIZE must be a number, got '$RANK_SIZE_ARG'" >&2; usage; }
COUNT=$((END - START))
RANK_START=${RANK_START:-0}
if [ "$RANK_SIZE_ARG" -lt $((RANK_START + COUNT)) ]; then
  echo "error: RANK_SIZE $RANK_SIZE_ARG is smaller than the $((RANK_START + COUNT)) ranks this launch implies" >&2
  usage
fi

OUTPUT_DIR=${OUTPUT_DIR:-output}
declare -a PIDS RANKS LOGS
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; done
}

for ((device = START; device < END; device++)); do
  rank=$((RANK_START + device - START))
  log_dir="$OUTPUT_DIR/log/rank_$rank"
  mkdir -p "$log_dir"
  log="$log_dir/mindformer.log"
  (
    export RANK_TABLE_FILE="$RANK_TABLE" DEVICE_ID=$device RANK_ID=$rank RANK_SIZE=$RANK_SIZE_ARG \
      LOCAL_RANK_SIZE=$COUNT
    exec setsid bash -c "$EXECUTE_ORDER" > "$log" 2>&1
  ) &
  PIDS+=($!)
  RANKS+=($rank)
  LOGS+=("$log")
  echo "rank $rank (device $device) started, pid $!, log $log"
done

if [ "$DETACH" -eq 1 ]; then
  echo "detached: $COUNT rank(s) running; follow the logs under $OUTPUT_DIR/log/"
  exit 0
fi

trap 'echo "interrupted: stopping all ranks" >&2; stop_all; exit 130' INT TERM

FAILED=()
remaining=$COUNT
declare -A DONE
while [ "$remaining" -gt 0 ]; do
  for i in "${!PIDS[@]}"; do
    [ -n "${DONE[$i]:-}" ] && continue
    pid=${PIDS[$i]}
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      status=$?
      DONE[$i]=$status
      remaining=$((remaining - 1))
      if [ "$status" -ne 0 ]; then
        FAILED+=("rank ${RANKS[$i]} (exit $status, log ${LOGS[$i]})")
      fi
    fi
  done
  if [ "${#FAILED[@]}" -gt 0 ] && [ "$remaining" -gt 0 ]; then
    echo "a rank failed: stopping the other $remaining rank(s)" >&2
    stop_all
    for i in "${!PIDS[@]}"; do
      [ -n "${DONE[$i]:-}" ] && continue
      wait "${PIDS[$i]}" 2>/dev/null
      DONE[$i]=stopped
    done
    remaining=0
  fi
  [ "$remaining" -gt 0 ] && sleep 0.2
done

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "FAILED: ${#FAILED[@]} rank(s):" >&2
  for f in "${FAILED[@]}"; do echo "  $f" >&2; done
  exit 1
fi
echo "all $COUNT rank(s) finished successfully"
