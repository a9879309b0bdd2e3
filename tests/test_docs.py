"""The docs tested: every command of the ```bash blocks of README.md and its pages in docs/ (in the README's
order) and of the Chinese tutorial (examples/reward_model_train_tutorial/README.md) runs as written, in order, on
CPU with the tiny config, in a working copy laid out like a user's clone, so the docs cannot drift from the code.

Every command extracted from the Markdown is exactly one of:
- run, as written, as a subprocess (`bash -c`), after the few substitutions in SUBSTITUTIONS;
- NPU-only, decided by an explicit marker in NPU_MARKERS (7B config, 8 devices, a multi-node table, ...): such
  a command needs a CPU twin that runs, in its own block or the next one (same script, see `scripts_of`);
- deliberately not run, listed with the reason in NOT_RUN.
A new block or command therefore cannot be skipped silently: it runs, or it needs a marker or an entry here.
The commands the book and the tutorial both start with (same text, same folder, fresh copy), and the msrun
training both then run on their data, run once, for both.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, TEST_JSONL, TOKENIZER, TRAIN_JSONL, cli_env, free_port

README = ROOT / "README.md"
# The English docs are one book: the README, then its pages in the order the README lists them. Their commands
# run in that order in one working copy (the serving page scores the checkpoint the tutorial page trained).
PAGES = [ROOT / "docs" / f"{name}.md"
         for name in ("tutorial", "backbones", "serving", "data", "lora", "packing", "configs", "performance")]
BOOK = [README, *PAGES]
TUTORIAL = EXAMPLES / "README.md"
TUTORIAL_DIR = "examples/reward_model_train_tutorial"  # relative to the working copy's root, as in the clone

# Where a block's commands run (relative to the working copy's root), by the "## " section holding the block
# (None: every other section). docs/tutorial.md: "Paths below are relative to that folder" for the tutorial's
# path; the pretrained-weights commands use paths from the project root. The tutorial: "下文命令均在本目录下执行" (None: every section).
CWD = {
    README: {"Quick start": "."},
    PAGES[0]: {None: TUTORIAL_DIR, "Starting from pretrained Llama2 weights": "."},
    PAGES[1]: {None: TUTORIAL_DIR},
    PAGES[2]: {None: TUTORIAL_DIR},
    PAGES[3]: {None: TUTORIAL_DIR},
    PAGES[4]: {None: "."},
    PAGES[5]: {None: "."},
    PAGES[6]: {None: "."},
    PAGES[7]: {None: "."},
    TUTORIAL: {None: TUTORIAL_DIR},
}

# Commands deliberately not run (compared with whitespace collapsed), each with the reason.
NOT_RUN = {
    "make demo": "runs the whole tutorial pipeline itself, already tested by tests/test_demo.py",
    "make test": "runs the whole test suite, this test included (recursion)",
    "tensorboard --logdir=loss_dir --port=6006": "starts a web server that runs until stopped",
    "MINDRLHF_API_KEY=change-me python reward_server.py --config "
    "../../model_configs/llama2_config/run_llama_2_tiny_rm_cpu.yaml --distributed_ckpt_path output/checkpoint "
    "--tokenizer /path/to/tokenizer.model --normalize --port 5000":
        "starts the reward server, which runs until stopped; tests/test_server.py runs it",
    "curl -s -H \"Authorization: Bearer change-me\" 127.0.0.1:5000/score -d '{\"prompt\": \"你好\", "
    "\"response\": \"你好！\"}'": "needs the server above; tests/test_server.py sends such requests",
    "python ../../benchmarks/check_hf_parity.py --distributed_ckpt_path output/checkpoint":
        "needs the optional torch (extra interop); benchmarks/ is not part of the user's working copy here",
    "python ../../benchmarks/bench_server.py --distributed_ckpt_path output/checkpoint":
        "a benchmark (minutes, all cores); make bench runs it",
}

# A command holding one of these is NPU-only (8 Ascend devices, 7B, several machines): not run here, and it must
# have a CPU twin beside it.
NPU_MARKERS = {
    "run_llama_2_7b_rm.yaml": "the 7B config: 8 Ascend devices, semi-auto parallel dp 2 x mp 4",
    "[0,8": "Ascend devices 0..7",
    "hccl_8p_": "an 8-device HCCL rank table",
    "--seq_length 4096": "the 7B sequence length",
    "Llama-2-7b-hf": "the 7B Hugging Face weights (a 13 GB download)",
    "node0.json": "rank tables written on each machine of a multi-node cluster",
}

# Run as written, then ended with Ctrl-C as the doc says once it has read the log (run_until_ready_then_ctrl_c).
STOPPED_WITH_CTRL_C = {
    "--parse_mode real-time": "follows the training log until Ctrl-C or 600 s without a new line",
}


def _port(_match, port):
    return f"{_match.group(1)} {port}"


MSRUN_TWO_WORKERS = r'(msrun_launcher\.sh "[^"]*" 2)$'  # one node, 2 workers, default port

# The only changes made to a command before it runs: (pattern, replacement, why).
SUBSTITUTIONS = [
    (re.escape("/path/to/llama2/tokenizer.model"), lambda m, port: str(TOKENIZER),
     "the user's Llama 2 tokenizer: the suite's copy in tests/data"),
    (re.escape("/path/to/tokenizer.model"), lambda m, port: str(TOKENIZER),
     "the user's Llama 2 tokenizer: the suite's copy in tests/data"),
    (MSRUN_TWO_WORKERS, _port,
     "msrun's default MASTER_PORT 8118 may be taken by a concurrent run of the suite: a free port instead"),
]

# The user's downloads (CValues-Comparison jsonl), put where the tutorial expects them: the first pairs of the
# suite's synthetic splits, few enough that the whole test takes minutes (an epoch of the tiny config, 8 pairs
# a step, is 40 steps; the resume example stops at step 20, half-way).
TRAIN_PAIRS, TEST_PAIRS = 320, 120
STEPS = TRAIN_PAIRS // 8
USER_DATA = {f"{TUTORIAL_DIR}/data/jsonl/train.jsonl": (TRAIN_JSONL, TRAIN_PAIRS),
             f"{TUTORIAL_DIR}/data/jsonl/test.jsonl": (TEST_JSONL, TEST_PAIRS)}
# The clone's folders the commands use (../../model_configs, ../../scripts, tests/ for the tiny HF model).
LINKED = ("mindrlhf", "model_configs", "scripts", "tests")


@dataclass
class Command:
    doc: Path
    block: int  # index of the ```bash block in its document
    line: int  # line of the command in the document
    section: str
    text: str

    @property
    def key(self):
        return " ".join(self.text.split())

    @property
    def where(self):
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self):
        if self.key in NOT_RUN:
            return "not run"
        if any(marker in self.text for marker in NPU_MARKERS):
            return "npu"
        return "run"


def split_commands(text):
    """Bash's reading of a block: backslash-newline joins lines (inside double quotes too), a word starting with an
    unquoted # is a comment to the end of its line, a newline outside quotes ends a command.
    Returns (line offset within the block, command text) pairs."""
    commands, cur, start, quote, i = [], "", 0, None, 0

    def end():
        if cur.strip():
            commands.append((start, cur.strip()))

    while i < len(text):
        c = text[i]
        if not cur.strip() and not c.isspace() and c != "#":
            start = text.count("\n", 0, i)
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\" and i + 1 < len(text):
            if text[i + 1] != "\n":
                cur += text[i:i + 2]
            i += 2
            continue
        elif quote == '"':
            quote = None if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (not cur or cur[-1].isspace()):
            j = text.find("\n", i)
            i = len(text) if j < 0 else j
            continue
        elif c == "\n":
            end()
            cur = ""
            i += 1
            continue
        cur += c
        i += 1
    assert quote is None, f"unterminated {quote} quote in:\n{text}"
    end()
    return commands


def extract(doc):
    """The commands of every ```bash block of doc, in order. Any other fence language than bash or none fails."""
    commands, section, fence, lang, body, start, block = [], None, None, None, [], 0, 0
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            opening = re.match(r"^(`{3,})\s*(\S*)", line)
            if opening:
                fence, lang, body, start = opening.group(1), opening.group(2), [], n
                assert lang in ("bash", ""), f"{doc}:{n}: a ```{lang} block is neither tested nor plain text"
            elif line.startswith("## "):
                section = line[3:].strip()
        elif line.strip() == fence:
            if lang == "bash":
                for offset, text in split_commands("\n".join(body)):
                    commands.append(Command(doc, block, start + 1 + offset, section, text))
                block += 1
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{doc}: unclosed code fence from line {start}"
    return commands


def scripts_of(text):
    """The scripts a command runs (launcher and the script it launches): what a CPU twin must share."""
    return set(re.findall(r"([\w-]+\.(?:py|sh))\b", text))


def twin_of(command, commands):
    same_doc = [c for c in commands if c.doc == command.doc and c.kind == "run"
                and c.block in (command.block, command.block + 1) and scripts_of(c.text) & scripts_of(command.text)]
    return same_doc[0] if same_doc else None


def cwd_of(command):
    table = CWD[command.doc]
    assert command.section in table or None in table, \
        f"{command.where}: no working directory for section {command.section!r}: add it to CWD"
    return table.get(command.section, table.get(None))


def substitute(text, port):
    for pattern, replace, _why in SUBSTITUTIONS:
        text = re.sub(pattern, lambda m, r=replace: r(m, port), text)
    return text


ALL = [command for doc in BOOK for command in extract(doc)] + extract(TUTORIAL)


def test_every_command_is_run_or_accounted_for():
    assert len([c for c in ALL if c.doc in BOOK]) >= 26 and len([c for c in ALL if c.doc == TUTORIAL]) >= 15
    problems = []
    for command in ALL:
        cwd_of(command)
        if "..." in command.text:
            problems.append(f"{command.where}: placeholder '...' in {command.key!r}: write the real command")
        if command.kind == "run" and re.search(r"<[A-Za-z][^<>]*>", command.text):
            problems.append(f"{command.where}: placeholder <...> in a command that runs: {command.key!r}")
        if command.kind == "npu" and twin_of(command, ALL) is None:
            problems.append(f"{command.where}: NPU-only command without a CPU twin (a command running the same "
                            f"script, in this block or the next) that runs here: {command.key!r}")
    assert not problems, "\n".join(problems)
    keys = {c.key for c in ALL}
    assert not set(NOT_RUN) - keys, f"stale NOT_RUN entries: {set(NOT_RUN) - keys}"
    for marker in STOPPED_WITH_CTRL_C:
        assert any(marker in c.text and c.kind == "run" for c in ALL), f"stale STOPPED_WITH_CTRL_C: {marker}"
    runs = [c.text for c in ALL if c.kind == "run"]
    for pattern, _replace, why in SUBSTITUTIONS:
        assert any(re.search(pattern, text) for text in runs), f"stale substitution {pattern!r} ({why})"
    for docs in (BOOK, [TUTORIAL]):
        text = " ".join(c.text for c in ALL if c.doc in docs)
        for path in USER_DATA:
            assert Path(path).relative_to(TUTORIAL_DIR).as_posix() in text, f"{docs[0]}: {path} no longer used"
    # Every msrun launch that runs gets its own port (the substitution above).
    assert all("msrun_launcher.sh" not in t or re.search(MSRUN_TWO_WORKERS, t) for t in runs)


def test_readme_is_a_front_door_and_every_link_resolves():
    """The README stays short (details live on the pages); every relative link of the README, the pages and the
    Chinese tutorial names a file that exists, and the README links every page."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200
    for doc in [*BOOK, TUTORIAL, ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+://", target):
                assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: broken link {target}"
    readme = README.read_text(encoding="utf-8")
    for page in PAGES:
        assert f"]({page.relative_to(ROOT).as_posix()})" in readme, f"README does not link {page.name}"


def test_split_commands_reads_blocks_as_bash_does():
    block = ('# header   # still a comment\n'
             'python a.py --x "#not a comment" \'# nor this\' \\\n'
             '    --y 2          # --y 4096\n'
             'bash b.sh "python c.py \\\n'
             '    --z 1" t.json [0,2] 2\n'
             'echo a#b  # c\n')
    assert split_commands(block) == [
        (1, 'python a.py --x "#not a comment" \'# nor this\'     --y 2'),
        (3, 'bash b.sh "python c.py     --z 1" t.json [0,2] 2'),
        (5, 'echo a#b'),
    ]


def working_copy(tmp_path):
    """A user's clone: the tutorial's scripts copied (commands write next to them), the rest linked, the data
    where the tutorial puts it."""
    root = tmp_path / "clone"
    (root / TUTORIAL_DIR).mkdir(parents=True)
    for name in LINKED:
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    for script in EXAMPLES.glob("*.py"):
        shutil.copy2(script, root / TUTORIAL_DIR / script.name)
    for dst, (src, lines) in USER_DATA.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        rows = src.read_text(encoding="utf-8").splitlines(keepends=True)
        (root / dst).write_text("".join(rows[:lines]), encoding="utf-8")
    return root


def run_until_ready_then_ctrl_c(text, cwd, log, timeout=300):
    """Start the command, wait until it says it has read the whole (finished) log ("caught up: N point(s)"),
    then send SIGINT to its process group as Ctrl-C in a terminal does; it must write its results and exit 0.
    Driven by that line alone; `timeout` only guards against a hang."""
    with open(log, "w", encoding="utf-8") as fh:
        # SIGINT as in a terminal: a suite started in the background of a non-interactive shell (`make test &`)
        # hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen(["bash", "-c", text], cwd=cwd, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    caught_up = None
    while caught_up is None and proc.poll() is None and time.monotonic() < deadline:
        caught_up = re.search(r"^caught up: (\d+) point", log.read_text(encoding="utf-8"), re.M)
        if caught_up is None:
            time.sleep(0.2)  # how often to look, not a margin
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text(encoding="utf-8")
    assert caught_up is not None and int(caught_up.group(1)) >= STEPS, output[-3000:]
    assert proc.returncode == 0 and "interrupted; writing what was read" in output, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result["points"] == int(caught_up.group(1)) and (cwd / result["png"]).is_file(), result
    return output


def runs_of(docs):
    return [c for c in ALL if c.doc in docs and c.kind == "run"]


def same_start(*command_lists):
    """How many leading commands every list runs alike: the same text in the same folder of a fresh working copy
    (an msrun launch, whose port is each run's own, ends it). Run once, they stand for each document's own."""
    count = 0
    while all(count < len(commands) for commands in command_lists):
        heads = {(c.key, cwd_of(c)) for c in (commands[count] for commands in command_lists)}
        if len(heads) > 1 or re.search(MSRUN_TWO_WORKERS, command_lists[0][count].text):
            break
        count += 1
    return count


def option(text, name):
    found = re.search(rf"--{name}\s+(\S+?)\"?(?:\s|$)", text)
    return found.group(1) if found else None


def shared_launches(count, *command_lists):
    """The msrun trainings every list runs alike after its first `count` commands (same text, same folder) whose
    run depends on those commands alone: the data they train on is written by one of them, and no command of any
    list before the launch names its output folder. Run once after the shared start, they stand for each
    document's own (the two-worker training is the slowest command of both)."""
    first = command_lists[0]
    shared = []
    for command in first[count:]:
        if not re.search(MSRUN_TWO_WORKERS, command.text):
            continue
        if not all(any((c.key, cwd_of(c)) == (command.key, cwd_of(command)) for c in commands[count:])
                   for commands in command_lists[1:]):
            continue
        data, out = option(command.text, "train_dataset"), option(command.text, "output_dir")
        assert data and out, f"{command.where}: an msrun launch without --train_dataset and --output_dir"
        if not any(data in c.text and cwd_of(c) == cwd_of(command) for c in first[:count]):
            continue
        before = [c for commands in command_lists
                  for c in commands[count:next(i for i, x in enumerate(commands) if x.key == command.key)]]
        if any(re.search(rf"(^|[\s/\"]){re.escape(out)}(/|\s|\"|$)", c.text) for c in before):
            continue
        shared.append(command)
    return shared


def run_commands(commands, root, port, tmp_path):
    """Run these commands, in order, in the working copy at root; returns their timings."""
    timings = []
    for command in commands:
        text = substitute(command.text, port)
        cwd = root / cwd_of(command)
        started = time.time()
        if any(marker in text for marker in STOPPED_WITH_CTRL_C):
            run_until_ready_then_ctrl_c(text, cwd, tmp_path / f"ctrl_c_{command.line}.log")
        else:
            proc = subprocess.run(["bash", "-c", text], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, (f"{command.where} exited {proc.returncode} in {cwd}:\n{text}\n"
                                          f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        timings.append(f"{time.time() - started:6.1f}s  {command.where}  {command.key[:100]}")
    return timings


@pytest.fixture(scope="module")
def common_start(tmp_path_factory):
    """A fresh working copy after the commands the book and the tutorial both start with (converting the train
    split, one epoch of the tiny config: the same commands in the same folders), then the msrun training both run
    on that data (shared_launches), run once for both."""
    tmp_path = tmp_path_factory.mktemp("docs_start")
    root = working_copy(tmp_path)
    book, tutorial = runs_of(BOOK), runs_of([TUTORIAL])
    count = same_start(book, tutorial)
    assert count >= 2, "the book and the tutorial no longer start alike: nothing to share"
    launches = shared_launches(count, book, tutorial)
    assert launches, "the book and the tutorial no longer share their msrun training: nothing to share"
    timings = run_commands(book[:count] + launches, root, free_port(), tmp_path)
    return {"root": root, "count": count, "launches": {(c.key, cwd_of(c)) for c in launches}, "timings": timings}


def run_docs(docs, tmp_path, common_start):
    """Every command of these documents that runs, in order, in one working copy: a copy of common_start's (its
    commands, the first of these documents' and their shared msrun training, already run there), then the rest."""
    root = tmp_path / "clone"
    shutil.copytree(common_start["root"], root, symlinks=True)
    commands = [c for c in runs_of(docs)[common_start["count"]:] if (c.key, cwd_of(c)) not in common_start["launches"]]
    assert len(commands) == len(runs_of(docs)) - common_start["count"] - len(common_start["launches"])
    timings = run_commands(commands, root, free_port(), tmp_path)
    print(f"\n{', '.join(str(doc.relative_to(ROOT)) for doc in docs)} (shared start and msrun training run once):\n"
          + "\n".join(common_start["timings"] + timings))
    return root


def eval_accuracy(path):
    results = json.loads(path.read_text(encoding="utf-8"))
    assert results["pairs"] == TEST_PAIRS
    return results["checkpoints"][-1]["accuracy"]


@pytest.mark.slow
def test_readme_and_docs_commands_run_in_order(tmp_path, common_start):
    root = run_docs(BOOK, tmp_path, common_start)
    tutorial = root / TUTORIAL_DIR
    assert eval_accuracy(tutorial / "output" / "eval_results.json") >= 0.9
    assert len((tutorial / "output" / "reward_infer_scores.jsonl").read_text().splitlines()) == 2 * TEST_PAIRS
    assert len((tutorial / "output" / "scores_2p.jsonl").read_text().splitlines()) == 2 * TEST_PAIRS
    for rank in (0, 1):
        assert list((tutorial / "output_2p" / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))
    for plot in ("loss_dir", "loss_dir_live"):
        assert (tutorial / plot / "loss.png").is_file()
    summary = json.loads((root / "output" / "train_summary.json").read_text())  # trained from llama2_tiny.ckpt
    assert summary["steps_logged"] == STEPS and (root / "llama2_tiny.ckpt").is_file()


@pytest.mark.slow
def test_tutorial_commands_run_in_order(tmp_path, common_start):
    root = run_docs([TUTORIAL], tmp_path, common_start)
    tutorial = root / TUTORIAL_DIR
    assert eval_accuracy(tutorial / "output" / "eval_results.json") >= 0.9
    assert (root / TUTORIAL_DIR / "hccl_2p_01_127.0.0.1.json").is_file()
    for rank in (0, 1):
        assert list((tutorial / "output_2p" / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))
    resumed = json.loads((tutorial / "output_resume" / "train_summary.json").read_text())
    assert resumed["resumed"] and resumed["steps_logged"] == STEPS  # 20 steps, then the other 20
