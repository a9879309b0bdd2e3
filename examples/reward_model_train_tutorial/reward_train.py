"""Train a Llama2 reward model (the tutorial's reward_train.py), through the MindFormers Trainer.

    python reward_train.py --config ../../model_configs/llama2_config/run_llama_2_7b_rm.yaml \
        --train_dataset data/mindrecord/train_4096.mindrecord
Resume an interrupted run:  ... --resume True --load_checkpoint output/checkpoint
On SIGTERM, SIGINT or --stop_file it stops after the current step with a checkpoint and exits 75 (resume it).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import main_guard, str2bool  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML, e.g. run_llama_2_7b_rm.yaml")
    parser.add_argument("--train_dataset", default="", help="MindRecord file or directory (overrides the YAML)")
    parser.add_argument("--run_mode", default="train", choices=["train"], help="only 'train' (as the tutorial)")
    parser.add_argument("--task", default="text_generation", help="MindFormers task name")
    parser.add_argument("--use_parallel", default=None, type=str2bool,
                        help="distributed run (True under a launcher); default: the YAML's use_parallel")
    parser.add_argument("--output_dir", default=None, help="where log/ and checkpoint/ go (default: YAML, ./output)")
    parser.add_argument("--load_checkpoint", default=None,
                        help="weights to start from, or with --resume the checkpoint directory holding rank_N/")
    parser.add_argument("--resume", default=False, type=str2bool, nargs="?", const=True,
                        help="continue an interrupted run (global step, optimizer state) from its checkpoints")
    parser.add_argument("--epochs", type=int, default=None, help="override runner_config.epochs")
    parser.add_argument("--batch_size", type=int, default=None, help="override the pairs per step")
    parser.add_argument("--save_steps", type=int, default=None, help="override CheckpointMonitor.save_checkpoint_steps")
    parser.add_argument("--stop_step", type=int, default=None, help="stop after this global step (checkpoint kept)")
    parser.add_argument("--stop_file", default=None,
                        help="stop after the step in which this file appears, with a checkpoint (as on SIGTERM); "
                             "exit code 75")
    parser.add_argument("--save_time_limit", type=float, default=None,
                        help="seconds the stop checkpoint may take (a scheduler's grace period): when the last "
                             "save of this run took longer, stop without one (resume from the previous)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an output_dir that holds an earlier run's checkpoints")
    parser.add_argument("--loss_type", default=None, choices=["span", "last_token"],
                        help="override model_config.loss_type: span (the tutorial's, default) or last_token "
                             "(Bradley-Terry on each sequence's last token, as TRL/OpenRLHF)")
    parser.add_argument("--center_rewards_coefficient", type=float, default=None,
                        help="override model_config.center_rewards_coefficient c: adds c * mean((r_chosen + "
                             "r_rejected)^2) (TRL); default 0")
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.training.trainer import train

    summary = train(args.config, args.train_dataset or None, task=args.task, output_dir=args.output_dir,
                    load_checkpoint=args.load_checkpoint, resume=args.resume, use_parallel=args.use_parallel,
                    epochs=args.epochs, batch_size=args.batch_size, save_steps=args.save_steps,
                    stop_step=args.stop_step, overwrite=args.overwrite, loss_type=args.loss_type,
                    center_rewards_coefficient=args.center_rewards_coefficient, stop_file=args.stop_file,
                    save_time_limit=args.save_time_limit)
    print(json.dumps({k: summary[k] for k in ("output_dir", "log_file", "checkpoint_dir", "steps_logged",
                                              "first_loss", "last_loss")}, indent=2))
    if summary.get("stopped"):
        sys.exit(summary["stopped"]["exit_code"])  # stopped on SIGTERM/SIGINT/--stop_file: run with --resume


if __name__ == "__main__":
    main()
