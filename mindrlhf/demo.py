"""The whole tutorial pipeline on CPU on a generated sample, end to end (`make demo`).

sample data + tokenizer (made here) -> cvalues_comparison.py -> reward_train.py -> reward_loss_plot.py ->
reward_eval.py -> reward_infer.py -> a short summary. Each step runs the tutorial script a user would run.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "reward_model_train_tutorial")
CONFIG = os.path.join(ROOT, "model_configs", "llama2_config", "run_llama_2_tiny_rm_cpu.yaml")


def run(step: str, script: str, *args, log_dir: str) -> float:
    """Run a tutorial script, its output teed to <log_dir>/<step>.log; stop the demo if it fails."""
    cmd = [sys.executable, os.path.join(EXAMPLES, script)] + [str(a) for a in args]
    print(f"\n== {step}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    start = time.time()
    log_path = os.path.join(log_dir, f"{step}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                cwd=os.path.dirname(log_dir))
        for line in proc.stdout:
            log.write(line)
            shown = _display(line)
            if shown:
                print("   " + shown, flush=True)
        proc.wait()
    if proc.returncode != 0:
        print(f"\n{step} failed (exit {proc.returncode}); full output: {log_path}", file=sys.stderr)
        sys.exit(proc.returncode)
    return time.time() - start


def _display(line: str):
    """The lines worth showing live: statistics, every 50th loss line, accuracies, scores."""
    from mindrlhf.tools.loss_log import NEW_LINE

    match = NEW_LINE.search(line)
    if match:
        step = int(match["step"])
        return f"step {step}/{match['steps']} loss {match['loss']}" if step == 1 or step % 50 == 0 else None
    keys = ("{\"count\"", "skipped", "Transformation", ".ckpt acc: [", "evaluated", "scored", "reward score",
            "\"points\"", "error:", "\"last_loss\"")
    return line.rstrip()[:160] if any(k in line for k in keys) else None


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), "demo_output"))
    parser.add_argument("--train_pairs", type=int, default=2400)
    parser.add_argument("--test_pairs", type=int, default=600)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)

    from mindrlhf.io import write_json, write_jsonl
    from mindrlhf.tools.sample_data import generate_pairs, train_tokenizer

    start = time.time()
    work = os.path.abspath(args.workdir)
    if os.path.exists(os.path.join(work, "summary.json")):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        work = f"{work}-{stamp}"  # never overwrite an earlier demo's results
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    data = os.path.join(work, "data")
    print(f"demo workdir: {work}")
    print("== sample data and tokenizer (generated here, nothing is downloaded)")
    train_rows = generate_pairs(args.train_pairs, seed=1)
    test_rows = generate_pairs(args.test_pairs, seed=2)
    train_jsonl = write_jsonl(os.path.join(data, "jsonl", "train.jsonl"), train_rows)
    test_jsonl = write_jsonl(os.path.join(data, "jsonl", "test.jsonl"), test_rows)
    tokenizer = train_tokenizer(train_rows, os.path.join(work, "tokenizer"))
    print(f"   {len(train_rows)} train / {len(test_rows)} test pairs; tokenizer {tokenizer}")

    seq = args.seq_length
    train_mr = os.path.join(data, "mindrecord", f"train_{seq}.mindrecord")
    test_mr = os.path.join(data, "mindrecord", f"test_{seq}.mindrecord")
    times = {}
    times["convert"] = run("convert_train", "cvalues_comparison.py", "--model", tokenizer, "--src_file", train_jsonl,
                           "--dst_file", train_mr, "--seq_length", seq, "--pad_token_id", 2, log_dir=logs)
    times["convert"] += run("convert_test", "cvalues_comparison.py", "--model", tokenizer, "--src_file", test_jsonl,
                            "--dst_file", test_mr, "--seq_length", seq, "--pad_token_id", 2, log_dir=logs)
    output = os.path.join(work, "output")
    times["train"] = run("train", "reward_train.py", "--config", CONFIG, "--train_dataset", train_mr,
                         "--output_dir", output, "--epochs", args.epochs, "--save_steps", 100, log_dir=logs)
    loss_dir = os.path.join(work, "loss_dir")
    times["plot"] = run("loss_plot", "reward_loss_plot.py", "--log_file",
                        os.path.join(output, "log", "rank_0", "info.log"), "--output_file_dir", loss_dir, log_dir=logs)
    eval_json = os.path.join(work, "eval_results.json")
    times["eval"] = run("eval", "reward_eval.py", "--config", CONFIG, "--distributed_ckpt_path",
                        os.path.join(output, "checkpoint"), "--load_all_ckpt", "True", "--eval_dataset", test_jsonl,
                        "--tokenizer", tokenizer, "--output_file", eval_json, log_dir=logs)
    infer_rows = os.path.join(data, "jsonl", "infer.jsonl")
    write_jsonl(infer_rows, [{"prompt": r["prompt"], "response": r["pos_resp"]} for r in test_rows[:3]] +
                [{"prompt": r["prompt"], "response": r["neg_resp"]} for r in test_rows[:3]])
    infer_out = os.path.join(work, "infer_scores.jsonl")
    times["infer"] = run("infer", "reward_infer.py", "--config", CONFIG, "--data_file", infer_rows, "--tokenizer",
                         tokenizer, "--distributed_ckpt_path", os.path.join(output, "checkpoint"),
                         "--output_file", infer_out, log_dir=logs)

    results = json.load(open(eval_json, encoding="utf-8"))
    newest = results["checkpoints"][-1]
    scores = [json.loads(line)["score"] for line in open(infer_out, encoding="utf-8")]
    train_summary = json.load(open(os.path.join(output, "train_summary.json"), encoding="utf-8"))
    summary = {
        "accuracy": newest["accuracy"], "pairs": newest["pairs"], "ties": newest["ties"],
        "per_type_accuracy": {k: v["accuracy"] for k, v in newest.get("per_type", {}).items()},
        "checkpoints_evaluated": [(c.get("step"), c.get("accuracy")) for c in results["checkpoints"]],
        "length_bias": newest["length_bias"],
        "calibration": {k: v for k, v in newest["calibration"].items() if k != "bins"},
        "first_loss": train_summary["first_loss"], "last_loss": train_summary["last_loss"],
        "infer_chosen_minus_rejected": [round(a - b, 4) for a, b in zip(scores[:3], scores[3:])],
        "seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(time.time() - start, 1),
        "outputs": {"workdir": work, "train_log": train_summary["log_file"],
                    "checkpoints": train_summary["checkpoint_dir"], "tensorboard": loss_dir,
                    "loss_png": os.path.join(loss_dir, "loss.png"), "eval_results": eval_json,
                    "eval_report": results["report"],
                    "infer_scores": infer_out, "logs": logs},
    }
    write_json(os.path.join(work, "summary.json"), summary)
    print("\n== summary")
    print(f"   pairwise accuracy on {summary['pairs']} test pairs: {summary['accuracy']:.4f} (ties {summary['ties']})")
    for kind, acc in summary["per_type_accuracy"].items():
        print(f"     {kind}: {acc:.4f}")
    print("   every checkpoint (step: accuracy; the last one is reported above): " +
          ", ".join(f"{step}: {acc:.4f}" for step, acc in summary["checkpoints_evaluated"]))
    lb, cal = summary["length_bias"], summary["calibration"]
    print(f"   length bias: accuracy {_num(lb['accuracy_chosen_longer'])} where the chosen answer is longer "
          f"({lb['pairs_chosen_longer']} pairs), {_num(lb['accuracy_chosen_shorter'])} where it is shorter "
          f"({lb['pairs_chosen_shorter']}); 'always pick the longer' {_num(lb['always_longer_accuracy'])}; "
          f"Spearman(reward, length) {_num(lb['spearman_reward_length'])}")
    print(f"   calibration: ECE {_num(cal['ece'])}, Bradley-Terry log-loss {_num(cal['bt_log_loss'])}")
    print(f"   report with figures: {results['report']}")
    print(f"   loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; "
          f"total {summary['total_seconds']:.0f}s")
    for name, path in summary["outputs"].items():
        print(f"   {name:13s} {path}")
    print(f"   (tensorboard --logdir={loss_dir} --port=6006)")
    return summary


if __name__ == "__main__":
    main()
