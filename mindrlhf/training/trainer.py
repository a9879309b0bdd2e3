"""Reward-model training through the MindFormers Trainer: config, checks, resume, and a summary.

Loss lines land in <output_dir>/log/rank_N/info.log, checkpoints in <output_dir>/checkpoint/rank_N/.
Resume = load_checkpoint pointing at a directory holding rank_N/ + resume_training (bit-exact continuation).
Under a launcher all ranks resume from the same step: the newest one every rank can read back whole.
"""
import json
import os
import sys
from typing import Optional, Tuple

from mindrlhf import distributed
from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError
from mindrlhf.training import config as cfg
from mindrlhf.training import host_memory

TRAIN_SUMMARY = "train_summary.json"


def resolve_resume_dir(path: str) -> str:
    """A checkpoint directory that holds rank_N/ with .ckpt files; a bare .ckpt cannot be resumed from."""
    if os.path.isfile(path):
        raise ConfigError(f"{path}: resume needs the checkpoint directory that holds rank_0/ (e.g. "
                          f"{os.path.dirname(os.path.dirname(os.path.abspath(path)))}), not a single .ckpt file")
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: checkpoint directory does not exist")
    if os.path.basename(os.path.normpath(path)).startswith("rank_"):
        path = os.path.dirname(os.path.normpath(path))
    if not os.path.isdir(os.path.join(path, "rank_0")) or not cfg.checkpoint_files(os.path.join(path, "rank_0")):
        raise ConfigError(f"{path}: no rank_0/*.ckpt to resume from")
    return os.path.abspath(path)


def readable_step(path: str) -> Optional[int]:
    """The global step of a checkpoint that reads back whole, else None (truncated or corrupt).

    The whole file is parsed; only the global_step tensor is materialised.
    """
    from mindrlhf.checkpoints.reader import checkpoint_step, load_checkpoint_dict

    try:
        return checkpoint_step(load_checkpoint_dict(path, choice_func=lambda name: name == "global_step"))
    except ConfigError:
        return None


def readable_checkpoints(ckpt_dir: str, rank_id: int = 0, warn=print) -> dict:
    """{global step: file name} of this rank's checkpoints that read back whole (newest file per step);
    corrupt or truncated ones are skipped with a warning naming the file."""
    found = {}
    for path in cfg.checkpoint_files(os.path.join(ckpt_dir, f"rank_{rank_id}")):
        step = readable_step(path)
        if step is None:
            warn(f"WARNING: skipping corrupt or truncated checkpoint {path}")
        else:
            found[step] = os.path.basename(path)
    return found


def resume_file(ckpt_dir: str, rank_id: int = 0, collective: bool = False, warn=print) -> str:
    """The checkpoint file name (what MindFormers' resume_training takes) this rank resumes from.

    Alone: the newest readable one. Under a launcher (collective=True) the ranks agree on the newest step that
    every rank can read, so one rank's truncated file sends all ranks back together.
    """
    found = readable_checkpoints(ckpt_dir, rank_id, warn)
    step = distributed.agree_on_step(found, log=warn) if collective else max(found, default=None)
    if step is None:
        raise ConfigError(f"{os.path.join(ckpt_dir, f'rank_{rank_id}')}: no readable checkpoint to resume from"
                          + (" at a step every rank has" if collective and found else ""))
    return found[step]


def is_resume_dir(path) -> bool:
    """A checkpoint directory of a run (holding rank_N/ or being one), as the tutorial's YAML resume sets it."""
    return bool(path) and os.path.isdir(path) and bool(cfg.checkpoint_files(path))


def prepare_config(config_path: str, *args, **overrides):
    """The run's MindFormerConfig with CLI overrides applied and everything checkable checked (prepare_run's)."""
    return prepare_run(config_path, *args, **overrides)[0]


def prepare_run(config_path: str, train_dataset: Optional[str] = None, output_dir: Optional[str] = None,
                load_checkpoint: Optional[str] = None, resume: bool = False,
                use_parallel: Optional[bool] = None, epochs: Optional[int] = None,
                batch_size: Optional[int] = None, save_steps: Optional[int] = None,
                stop_step: Optional[int] = None, overwrite: bool = False, loss_type: Optional[str] = None,
                center_rewards_coefficient: Optional[float] = None) -> Tuple[object, Optional[dict]]:
    """(the run's MindFormerConfig with CLI overrides applied and everything checkable checked, its LoRA settings or
    None): the settings are derived once, here, and passed to what needs them."""
    from mindrlhf.model.ascend_packing import check_flash_device
    from mindrlhf.model.loss import loss_options

    config = cfg.load_config(config_path)
    cfg.check_sections(config_path)
    if loss_type is not None:
        config.model.model_config.loss_type = loss_type
    if center_rewards_coefficient is not None:
        config.model.model_config.center_rewards_coefficient = float(center_rewards_coefficient)
    loss_options(config.model.model_config)
    settings = use_lora(config, config_path)
    if use_parallel is not None:
        config.use_parallel = use_parallel
    if output_dir:
        config.output_dir = os.path.abspath(output_dir)
    else:
        config.output_dir = os.path.abspath(config.get("output_dir") or "./output")
    if epochs:
        config.runner_config.epochs = int(epochs)
    if batch_size:
        config.runner_config.batch_size = int(batch_size)
        config.train_dataset.batch_size = int(batch_size)
    if save_steps:
        for callback in config.callbacks:
            if callback.get("type") == "CheckpointMonitor":
                callback["save_checkpoint_steps"] = int(save_steps)
    if stop_step:
        config.runner_config.stop_step = int(stop_step)
    cfg.set_dataset(config, "train", train_dataset)
    check_flash_device(config.model.model_config, config.context.get("device_target", "CPU"), config_path)
    cfg.set_packing(config, config_path)
    warning = cfg.cpu_recompute_warning(config, config_path)
    if warning:
        _warn(warning)
    if config.context.get("device_target") == "CPU" and config.runner_config.get("sink_mode"):
        raise ConfigError(f"{config_path}: runner_config.sink_mode must be False on CPU "
                          "(sink mode multiplies the step count there)")
    if not resume and not load_checkpoint and is_resume_dir(config.get("load_checkpoint")):
        # The tutorial's way: load_checkpoint in the YAML set to the run's checkpoint directory, same command.
        resume, load_checkpoint = True, config.load_checkpoint
    cfg.check_parallel(config, config_path)
    earlier = cfg.checkpoint_files(os.path.join(config.output_dir, "checkpoint"))
    if earlier and not resume and not overwrite:
        raise ConfigError(f"{config.output_dir}/checkpoint holds {len(earlier)} checkpoint(s) of an earlier run; "
                          "pass --resume to continue it, another --output_dir, or --overwrite to start over there "
                          "(old checkpoints may then be rotated away)")
    if resume:
        config.load_checkpoint = resolve_resume_dir(load_checkpoint or os.path.join(config.output_dir, "checkpoint"))
        config.resume_training = True  # the file is picked per rank in train(), once the rank is known
    elif load_checkpoint or config.get("load_checkpoint"):
        load_checkpoint = load_checkpoint or config.load_checkpoint
        # Weights only: through the model's own loader, which checks shapes and reports what it loaded.
        if not os.path.isfile(load_checkpoint):
            raise ConfigError(f"{load_checkpoint}: weights file does not exist (to resume a run, pass --resume "
                              "and its checkpoint directory)")
        config.model.model_config.checkpoint_name_or_path = os.path.abspath(load_checkpoint)
        config.load_checkpoint = ""
        config.resume_training = False
    if config.model.model_config.get("checkpoint_name_or_path") and not resume:
        # The Trainer clears checkpoint_name_or_path before building the model; the model reads this copy.
        # On resume the run's own checkpoint replaces every weight anyway, so the backbone is not loaded twice.
        config.model.model_config.backbone_checkpoint = config.model.model_config.checkpoint_name_or_path
    if settings and not resume and not config.model.model_config.get("backbone_checkpoint"):
        _warn("WARNING: LoRA on a randomly initialised backbone (no --load_checkpoint): only the LoRA matrices and "
              "the value head train, and the adapter belongs to random weights; pass the base weights to start from")
    return config, settings


def use_lora(config, config_path: str) -> Optional[dict]:
    """A YAML's pet_config, checked, moves to model_config.reward_lora: the model applies LoRA itself (see
    mindrlhf.model.lora), so MindFormers' build_network must not wrap it in its PetModel. Returns the settings
    (None without LoRA)."""
    from mindrlhf.model.lora import lora_settings

    model_config = config.model.model_config
    settings = lora_settings(model_config, f"{config_path}: model.model_config.pet_config")
    if settings and model_config.get("pet_config"):
        model_config.reward_lora = dict(model_config.pet_config)
        model_config.pet_config = None
    return settings


def train(config_path: str, train_dataset: Optional[str] = None, task: str = "text_generation", **overrides) -> dict:
    """Train and return a summary dict (also written as <output_dir>/train_summary.json by rank 0)."""
    import mindrlhf._mindformers  # noqa: F401  (quiet import first)
    from mindformers.core.context import build_context
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path

    from mindrlhf.data.dataset import PackingPlans, resolve_mindrecord_files
    from mindrlhf.checkpoints.adapters import write_run_lora
    from mindrlhf.tools.loss_log import parse_log
    from mindrlhf.training import checkpointing, preemption

    stop_file, save_time_limit = overrides.pop("stop_file", None), overrides.pop("save_time_limit", None)
    if stop_file and os.path.exists(stop_file):
        raise ConfigError(f"{stop_file}: the stop file exists already, so the run would stop after its first step; "
                          "remove it (the scheduler's hook creates it to stop the run)")
    config, settings = prepare_run(config_path, train_dataset, **overrides)
    files = resolve_mindrecord_files(cfg.dataset_source(config, "train"))
    template, margin = cfg.data_template_and_margin(config, files)
    set_output_path(config.output_dir)
    cpu = config.context.get("device_target") == "CPU"
    if cpu:
        host_memory.reserve_pool_block(config.context, log=_info)
    build_context(config)
    rank_id, rank_size = distributed.rank_and_size()
    collective = bool(config.use_parallel) and rank_size > 1
    if collective and cpu:
        use_cpu_barrier()
    with PackingPlans():  # the plan checked here is the one the dataset MindFormers builds trains on
        with distributed.same_verdict(collective):  # a failed check (a template mismatch on rank 0) stops every rank
            info = cfg.check_data_against_model(config, files, "train", rank_size if config.use_parallel else 1)
            if template is not None and rank_id == 0:
                record_run_template(os.path.join(config.output_dir, "checkpoint"), template,
                                    config.load_checkpoint if config.resume_training else None)
            base = ""
            if settings and rank_id == 0:  # alpha is in no tensor: scoring and merging read it from here
                base = write_run_lora(os.path.join(config.output_dir, "checkpoint"), settings,
                                      config.load_checkpoint if config.resume_training else None,
                                      config.model.model_config.get("backbone_checkpoint") or "")
        if config.resume_training:
            config.resume_training = resume_file(config.load_checkpoint, rank_id, collective, warn=_warn)
        stop_step = config.runner_config.pop("stop_step", None)
        checkpointing.SafeCheckpointMonitor.collective = collective
        state = preemption.begin(stop_file, save_time_limit, log=_warn)
        callbacks = ([stop_at(int(stop_step))] if stop_step else []) + [preemption.stop_callback(state, collective,
                                                                                                 rank_id)]
        try:
            trainer = Trainer(args=config, task=task, callbacks=callbacks)
            # On CPU the graph compile's freed host memory would stay resident under the step's tensors (host_memory)
            with host_memory.trimming(host_memory.trim_interval() if cpu else None):
                trainer.train()
        finally:
            preemption.end()
    _info(f"stop check at {len(state.check_seconds)} step ends: median {state.check_ms():.3f} ms")
    log_file = os.path.join(config.output_dir, "log", f"rank_{rank_id}", "info.log")
    points = parse_log(log_file) if os.path.isfile(log_file) else []
    ckpt_dir = os.path.join(config.output_dir, "checkpoint", f"rank_{rank_id}")
    summary = {
        "config": config_path, "train_dataset": files, "pairs": info["rows"], "rank_id": rank_id,
        "rank_size": rank_size, "output_dir": config.output_dir, "log_file": log_file,
        "checkpoint_dir": ckpt_dir, "checkpoints": cfg.checkpoint_files(ckpt_dir),
        "steps_logged": len(points), "first_loss": points[0].loss if points else None,
        "last_loss": points[-1].loss if points else None, "resumed": bool(config.resume_training),
        "template": template.name if template is not None else None, "margin": margin,
        "loss_type": config.model.model_config.get("loss_type") or "span",
        "center_rewards_coefficient": float(config.model.model_config.get("center_rewards_coefficient") or 0.0),
        "packing": dict(info["packing"], mode=config.train_dataset.packing) if info.get("packing") else False,
    }
    if state.stop_step is not None:
        summary["stopped"] = state.report()
        _warn(summary["stopped"]["message"])
    if rank_id == 0 and settings and state.stop_step is None:
        summary["lora"] = lora_adapter_of_run(config, config_path, summary["checkpoints"], settings, base)
    if rank_id == 0:
        with open(os.path.join(config.output_dir, TRAIN_SUMMARY), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    if collective and state.stop_step is not None:
        distributed.barrier()  # msrun kills the other workers once one exits non-zero: all are done here
    return summary


def lora_adapter_of_run(config, config_path: str, checkpoints, settings: dict, base: str = "") -> dict:
    """The end of a LoRA run: the adapter of its newest checkpoint in <output_dir>/adapter/<stem>.safetensors
    (base: the weights file the run started from, recorded in lora.json across resumes). A failure is reported in
    the summary, not raised: the checkpoints are written and scripts/lora_adapter.py can make the adapter later."""
    from mindrlhf.checkpoints.adapters import extract

    info = {"settings": settings, "adapter": None}
    if not checkpoints:
        return info
    newest = checkpoints[-1]
    stem = os.path.splitext(os.path.basename(newest))[0]
    adapter = os.path.join(os.path.abspath(config.output_dir), "adapter", f"{stem}.safetensors")
    # after trainer.train() MindFormers has replaced parallel_config by its TransformerOpParallelConfig object
    parallel = config_getter(config.get("parallel_config") or {})
    command = (f"python scripts/lora_adapter.py --config {config_path} --checkpoint {newest} --output {adapter}"
               + (f" --base_path {base}" if base else ""))
    if config.use_parallel and (int(parallel("model_parallel") or 1) > 1 or int(parallel("pipeline_stage") or 1) > 1):
        _warn(f"this LoRA run's checkpoints are model-parallel slices: make its adapter with {command}")
        return dict(info, command=command)
    try:
        result = extract(newest, settings, config_path, adapter, base_path=base, overwrite=True,
                         log=print)
    except ConfigError as err:
        _warn(f"WARNING: no adapter written for {newest}: {err}; make it later with {command}")
        return dict(info, error=str(err), command=command)
    return dict(info, adapter=adapter, base_path=base, base_sha256=result["base_sha256"], counts=result["counts"])


def record_run_template(checkpoint_root: str, template, resumed_from: Optional[str] = None):
    """Write the data's template beside the checkpoints (evaluation and inference render with it); resuming a
    run whose checkpoints were trained with another template is an error."""
    from mindrlhf.data.templates import read_run_template, run_template_path, write_run_template

    earlier = read_run_template(resumed_from) if resumed_from else None
    if earlier is not None and not earlier.same_as(template):
        raise ConfigError(f"{run_template_path(resumed_from)}: the checkpoints there were trained with the template "
                          f"'{earlier.name}', the data was converted with '{template.name}'; resume with data "
                          "converted with the run's template")
    write_run_template(checkpoint_root, template)


def use_cpu_barrier():
    """MindFormers' resume path waits on a Barrier op, which CPU does not have (`Unsupported op [Barrier] on
    CPU`); there it waits on an AllGather instead. Each module holds its own imported name, so each is set."""
    import importlib

    def barrier(*_args, **_kwargs):
        distributed.barrier()

    for module in ("mindspore.communication.comm_func", "mindformers.trainer.utils",
                   "mindformers.utils.load_checkpoint_utils", "mindformers.version_control",
                   "mindformers.core.callback.callback"):
        mod = importlib.import_module(module)
        if hasattr(mod, "barrier"):
            mod.barrier = barrier


def _info(message: str):
    from mindformers.tools.logger import logger

    logger.info(message)


def _warn(message: str):
    from mindformers.tools.logger import logger

    logger.warning(message)
    print(message, file=sys.stderr)


def stop_at(step: int):
    """A callback that stops after `step` global steps (a deliberate interruption, e.g. for resume tests)."""
    from mindspore.train.callback import Callback

    class StopAtStep(Callback):
        def on_train_step_end(self, run_context):
            # The optimizer's global_step is restored on resume, unlike cb_params.cur_step_num.
            optimizer = run_context.original_args().train_network.optimizer
            if int(optimizer.global_step.asnumpy().reshape(-1)[0]) >= step:
                run_context.request_stop()

    return StopAtStep()
