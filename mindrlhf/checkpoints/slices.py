"""Model-parallel slices -> whole tensors.

Slices saved with integrated_save: False under model parallel (<root>/rank_N/<name>_rank_N-....ckpt) are merged
with the run's strategy file through MindSpore's own transform_checkpoint_by_rank (host-side only: no device, no
communication). The slices of one name must come from one step. load_whole reads a checkpoint whole either way.
"""
import os
import re
import tempfile
from typing import Dict, Optional, Tuple

from mindrlhf.errors import ConfigError
from mindrlhf.io import replaced_whole
from mindrlhf.checkpoints.reader import file_step
from mindrlhf.checkpoints.reader import load_checkpoint_dict

STRATEGY_HINT = ("pass --src_strategy with the training run's strategy file (MindFormers writes it to "
                 "<output_dir>/strategy/ckpt_strategy_rank_0.ckpt)")


def rank_of_checkpoint(path: str) -> Tuple[str, int]:
    """(checkpoint root holding rank_N/, N) for <root>/rank_N/<file>.ckpt."""
    rank_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(rank_dir)
    if not re.fullmatch(r"rank_\d+", name):
        raise ConfigError(f"{path}: model-parallel slices live in <checkpoint root>/rank_N/; this file is not in a "
                          "rank_N folder")
    return os.path.dirname(rank_dir), int(name[len("rank_"):])


def checkpoint_root(path: str) -> str:
    """The folder holding rank_N/ (and the run's template.json) for --distributed_ckpt_path: a .ckpt, a rank_N
    directory, or the root itself. Works for paths that do not exist (then nothing is found there)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path) if os.path.isfile(path) or path.endswith(".ckpt") else path
    return os.path.dirname(folder) if re.fullmatch(r"rank_\d+", os.path.basename(folder)) else folder


def find_strategy(checkpoint: str, src_strategy: Optional[str] = None) -> Optional[str]:
    """The strategy file (or folder of them) for a sliced checkpoint: the one given, else the run's own
    <output_dir>/strategy/ beside <output_dir>/checkpoint/rank_N/; None when there is none."""
    if src_strategy:
        if not os.path.exists(src_strategy):
            raise ConfigError(f"--src_strategy {src_strategy} does not exist")
        return src_strategy
    root, _ = rank_of_checkpoint(checkpoint)
    candidate = os.path.join(os.path.dirname(root), "strategy")
    return candidate if os.path.isdir(candidate) and os.listdir(candidate) else None


def strategy_file(path: str, workdir: str) -> str:
    """One strategy file: the file itself, the only one in a folder, or (pipeline stages write one file per
    stage) the folder's files merged by MindSpore's merge_pipeline_strategys."""
    import mindspore as ms

    if os.path.isfile(path):
        return path
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".ckpt"))
    if not files:
        raise ConfigError(f"{path}: no strategy .ckpt files")
    stages = {open(f, "rb").read() for f in files}  # pylint: disable=consider-using-with
    if len(stages) == 1:  # every rank of one stage writes the same layout
        return files[0]
    merged = os.path.join(workdir, "merged_strategy.ckpt")
    ms.merge_pipeline_strategys(path, merged)
    return merged


def merge_slices(checkpoint: str, strategy: str, output_path: str) -> str:
    """<root>/rank_0/<file>.ckpt and its sibling slices (same file name with rank_N) -> one whole checkpoint.

    Every tensor the strategy lays out is reassembled; the others (global_step, loss scale) come from rank 0.
    Slices are picked by name, so their global_step must agree: a mix of steps is refused, naming the files.
    Written to a temporary name and renamed when complete (replaced_whole); a pipeline run's strategy files are
    merged in a scratch folder beside the output.
    """
    import mindspore as ms

    root, _ = rank_of_checkpoint(checkpoint)
    name = os.path.basename(checkpoint)
    with replaced_whole(output_path, suffix=".ckpt") as tmp, \
            tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_path))) as work:
        layout = strategy_file(strategy, work)
        try:
            ranks = ms.rank_list_for_transform(0, layout, None)
        except Exception as err:  # pylint: disable=broad-except  (protobuf and MindSpore raise several types)
            raise ConfigError(f"{strategy}: not a MindSpore strategy file ({str(err).splitlines()[0]})") from None
        files, steps = {}, {}
        for rank in ranks:
            path = os.path.join(root, f"rank_{rank}", re.sub(r"_rank_\d+", f"_rank_{rank}", name))
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: slice of rank {rank} is missing (the strategy {strategy} spreads "
                                  f"the model over ranks {sorted(ranks)})")
            steps[path] = file_step(path)  # a truncated slice fails here, by name
            files[rank] = path
        if os.path.abspath(checkpoint) not in map(os.path.abspath, steps):
            steps[checkpoint] = file_step(checkpoint)
        if len(set(steps.values())) > 1:  # names repeat across resumed runs: a stale rank's file matches the pattern
            shown = "; ".join(f"{path}: step {step}" for path, step in steps.items())
            raise ConfigError(f"{checkpoint}: the model-parallel slices of this name come from different steps "
                              f"({shown}); merging them would mix weights. Keep the slices of one step (move the "
                              "stale rank_N files away, e.g. left by a resumed or re-trained run) and rerun")
        ms.transform_checkpoint_by_rank(0, files, tmp, layout, None)
    return output_path


def load_whole(checkpoint: str, expected: Dict[str, Tuple[int, ...]], src_strategy: Optional[str] = None,
               log=print) -> dict:
    """A checkpoint's parameters with whole tensors: read as is, or merged from model-parallel slices when
    its shapes are those of slices. A shape that still differs is an error naming the tensor and what to pass."""
    params = load_checkpoint_dict(checkpoint)
    wrong = [(n, tuple(params[n].shape), shape) for n, shape in expected.items()
             if n in params and tuple(params[n].shape) != tuple(shape)]
    if not wrong:
        return params
    name, got, want = wrong[0]
    strategy = find_strategy(checkpoint, src_strategy)
    if strategy is None:
        raise ConfigError(f"{checkpoint}: parameter {name} has shape {got}, the model expects {want}: the file "
                          f"holds model-parallel slices; {STRATEGY_HINT}")
    with tempfile.TemporaryDirectory() as work:
        merged = merge_slices(checkpoint, strategy, os.path.join(work, "whole.ckpt"))
        params = load_checkpoint_dict(merged)
    log(f"merged the model-parallel slices of {checkpoint} with strategy {strategy}")
    for name, shape in expected.items():
        if name in params and tuple(params[name].shape) != tuple(shape):
            raise ConfigError(f"{checkpoint}: merged with {strategy}, parameter {name} has shape "
                              f"{tuple(params[name].shape)} but the model expects {tuple(shape)}: the strategy file "
                              f"is not the one of this run; {STRATEGY_HINT}")
    return params
