"""Check the reward-server settings docs/serving.md gives each RL framework against the framework installed in the
peers' venv (`make peer-venv`, then `.venv-peer/bin/pip install openrlhf verl`; `pip install --no-deps openrlhf verl
pyyaml` in any venv is enough for the source checks): not part of `make test`.

- OpenRLHF: its PPO CLI's parser (openrlhf/cli/train_ppo_ray.py) must define `--reward.remote_url` and not
  `--remote_rm_url` (the name before 0.11); installed with its dependencies, the CLI itself must list the one in
  --help and refuse the other.
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
dist = importlib.metadata.distribution("openrlhf")
source = dist.locate_file("openrlhf/cli/train_ppo_ray.py").read_text(encoding="utf-8")
result = {"version": dist.version, "reward.remote_url in the parser": 'add_argument("--reward.remote_url"' in source,
          "remote_rm_url absent from the parser": '"--remote_rm_url"' not in source}
cli = [sys.executable, "-m", "openrlhf.cli.train_ppo_ray"]
listed = subprocess.run(cli + ["--help"], capture_output=True, text=True)
if listed.returncode == 0:  # installed with its dependencies: the CLI itself
    old = subprocess.run(cli + ["--remote_rm_url", "x"], capture_output=True, text=True)
    result.update({"reward.remote_url in --help": "--reward.remote_url" in listed.stdout,
                   "remote_rm_url refused": old.returncode == 2 and "unrecognized arguments" in old.stderr})
else:
    result["cli"] = "not runnable (installed without its dependencies): its parser's source was read"
print(json.dumps(result))
"""

VERL = """
import importlib.metadata
import yaml
dist = importlib.metadata.distribution("verl")
found = {}
for file in dist.files:
    name = str(file)
    if name.startswith("verl/trainer/config/") and name.endswith("ppo_trainer.yaml"):
        config = yaml.safe_load(dist.locate_file(file).read_text(encoding="utf-8"))
        for key in ("reward.reward_model.rollout.name", "reward.reward_model.model_path",
                    "reward_model.rollout.name", "reward_model.model.path"):
            node = config
            for part in key.split("."):
                node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
            if node is not KeyError:
                found.setdefault(key, name)
loop = dist.locate_file("verl/experimental/reward_loop/reward_loop.py").read_text(encoding="utf-8")
print(json.dumps({"version": dist.version, "keys": found, "posts classify": '"classify"' in loop,
                  "posts v1/embeddings": '"v1/embeddings"' in loop,
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
    ok = {"openrlhf": lambda r: all(v for k, v in r.items() if k not in ("version", "cli")),
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
