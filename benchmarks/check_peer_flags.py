"""Check the reward-server settings docs/serving.md gives each RL framework against the framework installed in the
peers' venv (`make peer-venv`, then `.venv-peer/bin/pip install openrlhf verl`): not part of `make test`.

- OpenRLHF: its PPO CLI (`python -m openrlhf.cli.train_ppo_ray --help`) must list `--reward.remote_url`, and must
  refuse `--remote_rm_url` (the name before 0.11).
- verl: its trainer config must hold `reward.reward_model.rollout.name` and `reward.reward_model.model_path` (or,
  in older versions, `reward_model.rollout.name` and `reward_model.model.path`), and its reward loop must post to
  `classify` and `v1/embeddings`.
Each check names the installed version; a framework that is not installed is reported as unchecked (exit 1).
Writes benchmarks/results/peer_flags.json.
"""
import argparse
import json
import os
import subprocess
import sys

from common import ROOT, save

OPENRLHF = """
import importlib.metadata, subprocess, sys
version = importlib.metadata.version("openrlhf")
cli = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]
listed = subprocess.run(cli + ["--help"], capture_output=True, text=True)
old = subprocess.run(cli + ["--remote_rm_url", "http://127.0.0.1:5000/get_reward"], capture_output=True, text=True)
print(json.dumps({"version": version, "help_exit": listed.returncode,
                  "reward.remote_url listed": "--reward.remote_url" in listed.stdout,
                  "remote_rm_url refused": old.returncode == 2 and "unrecognized arguments" in old.stderr}))
"""

VERL = """
import importlib.metadata, importlib.util, pathlib
from omegaconf import OmegaConf
version = importlib.metadata.version("verl")
root = pathlib.Path(importlib.util.find_spec("verl").origin).parent
found = {}
for path in sorted((root / "trainer" / "config").glob("*ppo_trainer.yaml")):
    config = OmegaConf.load(path)
    for key in ("reward.reward_model.rollout.name", "reward.reward_model.model_path", "reward_model.rollout.name",
                "reward_model.model.path"):
        if OmegaConf.select(config, key, default="<absent>") != "<absent>":
            found.setdefault(key, path.name)
loop = (root / "experimental" / "reward_loop" / "reward_loop.py").read_text(encoding="utf-8")
print(json.dumps({"version": version, "keys": found,
                  "posts classify": '"classify"' in loop, "posts v1/embeddings": '"v1/embeddings"' in loop,
                  "sends use_activation": '"use_activation"' in loop}))
"""


def run(python: str, code: str) -> dict:
    proc = subprocess.run([python, "-c", "import json\n" + code], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"unchecked": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=str(ROOT / ".venv-peer" / "bin" / "python"),
                        help="the peers' venv interpreter")
    args = parser.parse_args()
    if not os.path.isfile(args.python):
        print(f"{args.python} does not exist: build the peers' venv (make peer-venv), install openrlhf and verl in it")
        return 1
    results = {"openrlhf": run(args.python, OPENRLHF), "verl": run(args.python, VERL)}
    ok = {"openrlhf": lambda r: r["reward.remote_url listed"] and r["remote_rm_url refused"],
          "verl": lambda r: (({"reward.reward_model.rollout.name", "reward.reward_model.model_path"} <= set(r["keys"])
                              or {"reward_model.rollout.name", "reward_model.model.path"} <= set(r["keys"]))
                             and r["posts classify"] and r["posts v1/embeddings"] and r["sends use_activation"])}
    for name, result in results.items():
        result["ok"] = None if "unchecked" in result else bool(ok[name](result))
        print(f"{name}: {json.dumps(result)}")
    verdicts = [r["ok"] for r in results.values()]
    save("peer_flags", dict(results, python=args.python))
    if False in verdicts:
        return 2
    return 1 if None in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
