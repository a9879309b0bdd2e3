"""reward_eval and reward_infer as functions: inputs -> scores -> human lines + JSON results.

Evaluation covers every pair of the test file (no drop_remainder, no sample cap), checkpoint by checkpoint.
Under a launcher with a collective backend (msrun, or HCCL on Ascend) each rank scores every N-th batch of the
same length-sorted batches and the scores are gathered, so N ranks take about 1/N of the time and give the
scores of one process bit for bit; rank 0 alone checks and writes the outputs, and every rank leaves with its
verdict (distributed.same_verdict), so no rank waits in an AllGather for one that has stopped.
"""
import os
import traceback
from typing import Callable, List, Optional

import numpy as np

from mindrlhf import distributed
from mindrlhf.data.formats import encode_pairs, is_rows_source, read_preference_pairs
from mindrlhf.data.pairs import SkipReport, read_rows
from mindrlhf.data.templates import (JINJA, TUTORIAL, FullTextNormaliser, choose_template, read_run_template,
                                     run_template_path)
from mindrlhf.errors import ConfigError, MindRLHFError
from mindrlhf.evaluation import report, rewardbench
from mindrlhf.evaluation.metrics import pairwise_metrics
from mindrlhf.checkpoints.slices import checkpoint_root
from mindrlhf.evaluation.scorer import (RewardScorer, base_file, length_batches, list_checkpoints,
                                        set_scoring_context)
from mindrlhf.io import check_new_output, write_json, write_jsonl


def start_ranks(config, log: Callable) -> tuple:
    """(rank, part, parts): the launcher's rank (rank 0 writes), and this rank's part of the work among `parts`
    ranks sharing it. Without a collective backend (the rank-table launcher on CPU) every rank scores
    everything (part 0 of 1), and says so."""
    target = set_scoring_context(config)
    rank, size = distributed.rank_and_size()
    if distributed.communicator_ready(target):
        return rank, rank, size
    if size > 1:
        log(f"WARNING: rank {rank} of {size} has no collective backend here (rank-table launcher on {target}); "
            "it scores every item itself")
    return rank, 0, 1


def _is_json_file(path: str) -> bool:
    return str(path).endswith((".jsonl", ".json"))


def run_template(ckpt_path: str, requested: Optional[str], tokenizer, eval_source: Optional[str] = None):
    """The template to render with: the one recorded beside the checkpoints (training wrote it), confirmed by
    --template if given; an eval MindRecord converted with another template is an error."""
    from mindrlhf.data.templates import data_template

    root = checkpoint_root(ckpt_path)
    recorded = read_run_template(root)
    data = None
    if eval_source and not is_rows_source(eval_source):
        from mindrlhf.data.dataset import resolve_mindrecord_files

        data = data_template(resolve_mindrecord_files(eval_source))
    template = choose_template(requested, tokenizer, recorded, run_template_path(root), data, str(eval_source))
    if template.kind == JINJA and tokenizer is not None and not hasattr(tokenizer, "special_tokens"):
        raise ConfigError(f"the run's template '{template.name}' is a chat template: pass its Hugging Face tokenizer "
                          "folder (tokenizer.json) as --tokenizer")
    return template


def load_eval_pairs(source: str, seq_length: int, tokenizer=None, skip_invalid: bool = False,
                    template=TUTORIAL, fmt: Optional[str] = None) -> dict:
    """{'chosen': [ids], 'rejected': [ids], 'pos_type': [...], 'neg_type': [...]} from preference rows (any
    layout, `fmt` or read from the columns) or MindRecord."""
    if is_rows_source(source):
        if tokenizer is None:
            raise ConfigError(f"{source}: a jsonl eval set needs --tokenizer (a local tokenizer.model or tokenizer "
                              "folder)")
        report = SkipReport()
        pairs = list(read_preference_pairs(source, fmt, skip_invalid=skip_invalid, report=report))
        if not pairs:
            raise ConfigError(f"{source}: no pairs to evaluate")
        ids = encode_pairs(template, tokenizer, pairs)
        n = len(pairs)
        return {"chosen": [x[:seq_length] for x in ids[:n]], "rejected": [x[:seq_length] for x in ids[n:]],
                "pos_type": [p.pos_type for p in pairs], "neg_type": [p.neg_type for p in pairs],
                "skipped": report.as_dict()}
    from mindspore.mindrecord import FileReader

    from mindrlhf.data.dataset import resolve_mindrecord_files

    out = {"chosen": [], "rejected": [], "pos_type": None, "neg_type": None, "skipped": {"total": 0}}
    for path in resolve_mindrecord_files(source):
        reader = FileReader(path, num_consumer=1, columns=["chosen_input_ids", "chosen_attention_mask",
                                                          "rejected_input_ids", "rejected_attention_mask"])
        try:
            for row in reader.get_next():
                out["chosen"].append(row["chosen_input_ids"][:int(row["chosen_attention_mask"].sum())].tolist())
                out["rejected"].append(
                    row["rejected_input_ids"][:int(row["rejected_attention_mask"].sum())].tolist())
        finally:
            reader.close()
    if not out["chosen"]:
        raise ConfigError(f"{source}: the eval dataset is empty")
    return out


def score_pairs(scorer: RewardScorer, data: dict, pairs_per_batch: int, log: Callable[[str], None],
                progress: bool = True, rank: int = 0, size: int = 1):
    """Chosen and rejected rewards for every pair, logging the tutorial's 'acc: [x]; avg acc: [y]' lines.

    With size > 1 this rank scores every size-th batch (its log shows its own batches) and all ranks end with
    every pair's scores.
    """
    from tqdm import tqdm

    n = len(data["chosen"])
    batches = length_batches([max(len(c), len(r)) for c, r in zip(data["chosen"], data["rejected"])],
                             pairs_per_batch)[rank::size]
    chosen = np.full(n, np.nan, dtype=np.float32)
    rejected = np.full(n, np.nan, dtype=np.float32)
    wins = 0
    done = 0
    for idx in tqdm(batches, desc=f"evaluating (rank {rank})" if size > 1 else "evaluating", unit="batch",
                    disable=not progress):
        scores = scorer.score_ids([data["chosen"][i] for i in idx] + [data["rejected"][i] for i in idx])
        chosen[idx], rejected[idx] = scores[:len(idx)], scores[len(idx):]
        batch_wins = int((chosen[idx] > rejected[idx]).sum())
        wins += batch_wins
        done += len(idx)
        log(f"acc: [{batch_wins / len(idx):.6f}]; avg acc: [{wins / done:.6f}]")
    if size > 1:
        mine = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        chosen = distributed.gather_shares(chosen[mine], mine, n).astype(np.float32)
        rejected = distributed.gather_shares(rejected[mine], mine, n).astype(np.float32)
    return chosen, rejected


def evaluate(config_path: str, ckpt_path: str, load_all: bool = False, eval_dataset: Optional[str] = None,
             tokenizer: Optional[str] = None, output_file: Optional[str] = None, batch_size: Optional[int] = None,
             scores_file: Optional[str] = None, skip_invalid: bool = False, log: Callable = print,
             progress: bool = True, overwrite: bool = False, src_strategy: Optional[str] = None,
             template: Optional[str] = None, save_stats: bool = False, adapter: Optional[str] = None,
             fmt: Optional[str] = None, benchmark: Optional[str] = None, report_dir: Optional[str] = None) -> dict:
    """fmt: the preference layout of a rows file; benchmark: rewardbench or rewardbench2 (rewardbench.py), scored
    per checkpoint; report_dir: the report (report.py; default <output_file without .json>_report/).
    save_stats: also write the newest evaluated checkpoint's reward mean/std beside it (normalize.py).
    adapter: a LoRA adapter scored on the base weights file ckpt_path; its folder holds the template and stats."""
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation import normalize
    from mindrlhf.training.config import dataset_source, load_config

    config = load_config(config_path)
    rank, part, parts = start_ranks(config, log)
    output_file = output_file or os.path.join(os.path.abspath(config.get("output_dir") or "./output"),
                                              "eval_results.json")
    with distributed.same_verdict(parts > 1):  # everything before the first AllGather, agreed by every rank
        if rank == 0:
            check_new_output(output_file, overwrite)
            check_new_output(scores_file, overwrite)
            report.check_report_dir(report_dir or _report_dir(output_file), overwrite)
            if save_stats:
                normalize.check_stats_output(checkpoint_root(adapter or ckpt_path), overwrite)
        source = eval_dataset or dataset_source(config, "eval")
        if not source:
            raise ConfigError("no eval dataset: pass --eval_dataset or set eval_dataset.data_loader.dataset_dir")
        tok = load_tokenizer(tokenizer) if tokenizer else None
        chosen_template = run_template(adapter or ckpt_path, template, tok, source)
        seq_length = int(config.model.model_config.seq_length)
        if benchmark:
            data = rewardbench.load_benchmark(source, benchmark, tok, chosen_template, seq_length, skip_invalid)
        else:
            data = load_eval_pairs(source, seq_length, tok, skip_invalid, chosen_template, fmt)
        checkpoints = [base_file(ckpt_path, adapter)] if adapter else list_checkpoints(ckpt_path)
        if not load_all:
            checkpoints = checkpoints[-1:]
        pairs_per_batch = int(batch_size or config.eval_dataset.get("batch_size") or 8)
        scorer = RewardScorer(config, batch_size=2 * pairs_per_batch, log=log, config_name=config_path)
    results, report_scores = [], []
    lengths = report.response_lengths(data["chosen"], data["rejected"])
    for ckpt in checkpoints:
        failed = None
        try:
            scorer.load_weights(ckpt, src_strategy, adapter)
        except MindRLHFError as err:
            failed = err
        except Exception as err:  # pylint: disable=broad-except  (MindSpore's own errors: every rank must hear)
            log(traceback.format_exc())
            failed = ConfigError(f"{ckpt}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})")
        if parts > 1:  # a file one rank cannot read is skipped by all, or they would gather different batches
            failed = distributed.first_error(failed)
        if failed is not None:
            log(f"WARNING: skipping {failed}")
            results.append({"checkpoint": ckpt, "error": str(failed)})
            continue
        chosen, rejected = score_pairs(scorer, data, pairs_per_batch, log, progress, part, parts)
        metrics = pairwise_metrics(chosen, rejected, data["pos_type"], data["neg_type"])
        metrics.update(checkpoint=ckpt, step=scorer.step, **({"adapter": adapter} if adapter else {}))
        if benchmark:
            metrics[benchmark] = rewardbench.benchmark_scores(data["benchmark"], chosen, rejected)
            for line in rewardbench.format_benchmark(benchmark, metrics[benchmark]):
                log(line)
        metrics.update(report.pair_figures(chosen, rejected, lengths))
        report_scores.append((scorer.step, chosen, rejected))
        results.append(metrics)
        log(report.format_figures(metrics))
        log(f"{ckpt} acc: [{metrics['accuracy']:.6f}]")  # the tutorial's line, last for each checkpoint
        newest_scores = (adapter or ckpt, scorer.step, chosen, rejected)
    good = [r for r in results if "error" not in r]
    if not good:
        raise ConfigError(f"{ckpt_path}: no checkpoint could be evaluated; {results[-1]['error']}")
    summary = {"config": config_path, "eval_dataset": source, "template": chosen_template.name,
               "pairs": len(data["chosen"]),
               "skipped_rows": data["skipped"], "checkpoints": results,
               "best": max(good, key=lambda r: r["accuracy"])["checkpoint"]}
    if len(results) > 1:
        log(format_table(results))
    with distributed.same_verdict(parts > 1):  # a failed write (a std of 0, a full disk) stops every rank alike
        if scores_file and rank == 0:
            _write_scores(scores_file, *newest_scores[2:])
        if save_stats and rank == 0:
            summary["stats_file"] = normalize.save_stats(checkpoint_root(adapter or ckpt_path), *newest_scores, source,
                                                         overwrite)
            log(f"reward statistics of {newest_scores[0]}: {summary['stats_file']}")
        folder = report_dir or _report_dir(output_file)
        summary["report"] = os.path.join(folder, "report.md")  # every rank names it: rank 0 writes it
        if rank == 0:
            report.write_report(folder, summary, report_scores, overwrite)  # the CLI's last line names it
            write_json(output_file, summary)
    summary["output_file"] = output_file
    return summary


def _report_dir(output_file: str) -> str:
    root, ext = os.path.splitext(output_file)
    return (root if ext == ".json" else output_file) + "_report"


def format_table(results: List[dict]) -> str:
    lines = [f"{'step':>8}  {'accuracy':>8}  {'ties':>5}  {'margin':>8}  checkpoint"]
    for r in results:
        if "error" in r:
            lines.append(f"{'-':>8}  {'error':>8}  {'-':>5}  {'-':>8}  {r['checkpoint']}")
        else:
            lines.append(f"{str(r['step']):>8}  {r['accuracy']:8.4f}  {r['ties']:5d}  {r['margin_mean']:8.4f}  "
                         f"{r['checkpoint']}")
    return "\n".join(lines)


def _write_scores(path, chosen, rejected):
    rows = [{"index": i, "chosen_score": float(c), "rejected_score": float(r)}
            for i, (c, r) in enumerate(zip(chosen, rejected))]
    write_jsonl(path, rows)


def read_infer_rows(path: str, skip_invalid: bool = False, report: Optional[SkipReport] = None,
                    fmt: Optional[str] = None):
    """(prompt, response) items from rows with prompt+response, or preference rows of any layout (both sides
    scored), or {"query": full text} items as an RL loop sends them to the server (normalised as the server does)."""
    from mindrlhf.data.pairs import iter_json_rows

    items = []
    first = {} if fmt or not _is_json_file(path) else next(
        (row for _, row in iter_json_rows(path) if isinstance(row, dict)), {})
    if fmt:
        first = {"chosen": None}
    if "query" in first:
        for line, row in read_rows(path, ("query",), (), skip_invalid, report):
            items.append({"line": line, "query": row["query"]})
    elif "response" in first:
        for line, row in read_rows(path, ("prompt", "response"), (), skip_invalid, report):
            items.append({"line": line, "prompt": row["prompt"], "response": row["response"]})
    elif "chosen" in first or str(path).endswith(".parquet") or os.path.isdir(str(path)):
        for pair in read_preference_pairs(path, fmt, skip_invalid, report):  # every layout: both sides scored
            for kind in ("chosen", "rejected"):
                messages = getattr(pair, f"{kind}_messages")
                items.append({"line": pair.line, "prompt": pair.prompt, "response": getattr(pair, kind), "kind": kind,
                              **({"messages": messages} if messages else {})})
    else:
        for line, row in read_rows(path, ("prompt", "pos_resp", "neg_resp"), (), skip_invalid, report):
            items.append({"line": line, "prompt": row["prompt"], "response": row["pos_resp"], "kind": "pos_resp"})
            items.append({"line": line, "prompt": row["prompt"], "response": row["neg_resp"], "kind": "neg_resp"})
    return items


def infer(config_path: str, data_file: str, tokenizer: str, ckpt_path: str, output_file: Optional[str] = None,
          batch_size: int = 16, skip_invalid: bool = False, log: Callable = print, overwrite: bool = False,
          src_strategy: Optional[str] = None, template: Optional[str] = None, normalize: bool = False,
          adapter: Optional[str] = None, fmt: Optional[str] = None) -> dict:
    """fmt: the preference layout of data_file (default: read from its columns).
    normalize: score = (raw - mean) / std with the checkpoint's reward_stats.json; raw_score keeps the raw.
    adapter: a LoRA adapter scored on the base weights file ckpt_path; its folder holds the template and stats."""
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.normalize import load_stats, normalize as apply_stats
    from mindrlhf.training.config import load_config

    config = load_config(config_path)
    rank, part, parts = start_ranks(config, log)
    output_file = output_file or os.path.join(os.path.abspath(config.get("output_dir") or "./output"),
                                              "reward_infer_scores.jsonl")
    with distributed.same_verdict(parts > 1):  # everything before the first AllGather, agreed by every rank
        if rank == 0:
            check_new_output(output_file, overwrite)
        tok = load_tokenizer(tokenizer)
        chosen_template = run_template(adapter or ckpt_path, template, tok)
        report = SkipReport()
        items = read_infer_rows(data_file, skip_invalid, report, fmt)
        if not items:
            raise ConfigError(f"{data_file}: nothing to score")
        checkpoint = base_file(ckpt_path, adapter) if adapter else list_checkpoints(ckpt_path)[-1]
        weights = adapter or checkpoint
        stats = load_stats(checkpoint_root(weights), weights) if normalize else None
        scorer = RewardScorer(config, checkpoint, batch_size=batch_size, src_strategy=src_strategy, log=log,
                              config_name=config_path, adapter=adapter)
    normalise = FullTextNormaliser.build(chosen_template, tok) if "query" in items[0] else None
    texts = [normalise(it["query"]) if normalise else
             chosen_template.render_messages(it["messages"], f"{data_file}:{it['line']}") if "messages" in it else
             chosen_template.render(it["prompt"], it["response"]) for it in items]
    scores = scorer.score_ids(tok.encode(texts, special_tokens=chosen_template.special_tokens), part, parts)
    mine = np.flatnonzero(~np.isnan(scores))
    for i in mine:  # each rank logs what it scored
        log(f"Sample:\n{texts[i]}")
        log(f"reward score: [[{scores[i]:.6f}]]")
    if parts > 1:
        scores = distributed.gather_shares(scores[mine], mine, len(items)).astype(np.float32)
    for it, score in zip(items, scores):
        it["score"] = float(score)
    if stats is not None:
        log(f"normalized with mean {stats['mean']:.6f}, std {stats['std']:.6f} from {stats['path']}")
        for it, score in zip(items, apply_stats(scores, stats)):
            it["raw_score"], it["score"] = it["score"], float(score)
    if rank == 0:
        write_jsonl(output_file, items)
    return {"checkpoint": checkpoint, **({"adapter": adapter} if adapter else {}), "scored": len(items),
            "output_file": output_file, "skipped_rows": report.as_dict(), "template": chosen_template.name}
