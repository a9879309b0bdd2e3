"""Ranks under either launcher: who am I, what is my share, gather to everyone, agree on a step.

The one place that reads RANK_ID / RANK_SIZE (run_distribute_reward.sh, msrun, MindFormers all set them) and
talks across ranks. Collectives use AllGather only: it is the one collective MindSpore runs on CPU (msrun) as on
Ascend (HCCL); CPU AllReduce supports SUM only and CPU has no Barrier op at all.
Imports MindSpore lazily, so rank lookups cost nothing for tools that never communicate.
"""
import json
import os
import traceback
from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np


def rank_and_size():
    """(rank, world size) from the launcher's environment; (0, 1) for a plain process."""
    rank = os.environ.get("RANK_ID") or os.environ.get("MS_NODE_ID") or "0"
    size = os.environ.get("RANK_SIZE") or os.environ.get("MS_WORKER_NUM") or "1"
    return int(rank), max(int(size), 1)


def local_rank_count() -> int:
    """How many ranks of the job run on this host (they share its cores).

    LOCAL_RANK_SIZE, MindSpore's own name for it (get_local_rank_size() reads it before init()), which both our
    launchers export (run_distribute_reward.sh: its device range; msrun_launcher.sh: LOCAL_WORKER_NUM; msrun
    itself exports only the global MS_WORKER_NUM / RANK_SIZE); else, with an HCCL rank table, the devices listed
    for the server that holds this RANK_ID; else the world size (never more threads than cores)."""
    value = os.environ.get("LOCAL_RANK_SIZE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    rank, size = rank_and_size()
    table = os.environ.get("RANK_TABLE_FILE")
    if table and size > 1:
        try:
            with open(table, encoding="utf-8") as fh:
                servers = json.load(fh).get("server_list") or []
            for server in servers:
                devices = server.get("device") or []
                if any(str(device.get("rank_id")) == str(rank) for device in devices):
                    return len(devices)
        except (OSError, ValueError, AttributeError):
            pass
    return size


def is_writer() -> bool:
    """Only rank 0 checks and writes shared outputs (results, summaries); its checks go through same_verdict."""
    return rank_and_size()[0] == 0


def under_msrun() -> bool:
    """msrun runs the script in its scheduler process too (MS_ROLE=MS_SCHED): there init() serves the cluster
    and the workers' init() waits for it, so the scheduler must call init() as well."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and bool(os.environ.get("MS_SCHED_HOST"))


def share(indices: Sequence[int], rank: int, size: int) -> List[int]:
    """This rank's part of a work list: every size-th item from rank on, so a length-sorted list gives every
    rank the same mix of short and long items (and about 1/size of the time)."""
    return list(indices)[rank::size]


def communicator_ready(device_target: str) -> bool:
    """True when a collective backend is up, initialising it when a launcher provided one.

    msrun (CPU or Ascend) or an HCCL rank table on Ascend; the rank-table launcher on CPU has none.
    Call after mindspore.set_context(device_target=...). (Asking MindSpore for the device target here instead
    makes init() hang under msrun on CPU, hence the argument.)
    """
    from mindspore.communication import GlobalComm, init

    if rank_and_size()[1] <= 1 and not under_msrun():
        return False
    if GlobalComm.INITED:
        return True
    if under_msrun() or (device_target == "Ascend" and os.environ.get("RANK_TABLE_FILE")):
        init()
        return True
    return False


def all_gather(array: np.ndarray) -> np.ndarray:
    """(k, ...) on every rank -> (size * k, ...) on every rank, in rank order. Same k on every rank."""
    import mindspore as ms
    from mindspore import ops

    array = np.ascontiguousarray(array)
    return ops.AllGather()(ms.Tensor(array)).asnumpy()


def barrier():
    """Wait for every rank (an AllGather of one number: CPU has no Barrier op)."""
    all_gather(np.zeros(1, np.int32))


def gather_shares(values: np.ndarray, indices: Sequence[int], total: int, fill=np.nan) -> np.ndarray:
    """Each rank's values for its `indices` -> the whole (total,) array on every rank.

    Shares may differ in length; they are padded to the longest before the AllGather. float64 carries float32
    scores and integer indices exactly.
    """
    width = int(all_gather(np.array([len(indices)], np.int64)).max())
    mine = np.full((1, 2, max(width, 1)), -1.0, dtype=np.float64)
    mine[0, 0, :len(indices)] = values
    mine[0, 1, :len(indices)] = indices
    whole = np.full(total, fill, dtype=np.float64)
    for part_values, part_index in all_gather(mine):
        keep = part_index >= 0
        whole[part_index[keep].astype(np.int64)] = part_values[keep]
    return whole


def agree_on_step(readable_steps: Iterable[int], log: Callable[[str], None] = print) -> Optional[int]:
    """The newest step that every rank has readable; None when there is none.

    Each rank passes the global steps of its own checkpoints that read back whole. Rank by rank the lists differ
    when a kill left one rank's newest file truncated or missing; then all fall back together.
    """
    mine = sorted(set(int(s) for s in readable_steps), reverse=True)
    longest = int(all_gather(np.array([len(mine)], np.int64)).max())
    if longest == 0:
        return None
    row = np.full((1, longest), -1, np.int64)
    row[0, :len(mine)] = mine
    lists = all_gather(row)
    common = set(mine)
    for other in lists:
        common &= set(int(s) for s in other if s >= 0)
    agreed = max(common) if common else None
    newest = max((int(s) for s in lists.reshape(-1) if s >= 0), default=None)
    if agreed != newest:
        log(f"WARNING: not every rank can read step {newest}; all ranks resume from step {agreed}")
    return agreed


def _encode_error(err: Optional[BaseException]) -> np.ndarray:
    if err is None:
        return np.zeros(0, np.int32)
    from mindrlhf.errors import MindRLHFError

    text = str(err) if isinstance(err, MindRLHFError) else f"{type(err).__name__}: {err}"
    return np.frombuffer(f"{type(err).__name__}\n{text}".encode("utf-8"), np.uint8).astype(np.int32)


def first_error(err: Optional[BaseException]) -> Optional[BaseException]:
    """Every rank passes its own error (or None); every rank gets the lowest failing rank's, or None.

    Two AllGathers: the lengths of the encoded messages (0: no error), then the messages padded to the longest.
    The failing rank keeps its own MindRLHFError; the others get one with the same message. Any other exception
    (a crash) becomes that same MindRLHFError on every rank, the failing one too, so all leave with one line;
    the failing rank's log keeps the crash's traceback.
    """
    from mindrlhf import errors

    mine = _encode_error(err)
    lengths = all_gather(np.array([len(mine)], np.int64))
    failing = [r for r, n in enumerate(lengths) if n > 0]
    if not failing:
        return None
    row = np.zeros((1, int(lengths.max())), np.int32)
    row[0, :len(mine)] = mine
    messages = all_gather(row)  # every rank takes part, the failing one too
    first = failing[0]
    own = first == rank_and_size()[0] and err is not None
    if own and isinstance(err, errors.MindRLHFError):
        return err
    kind, _, text = bytes(messages[first, :int(lengths[first])].astype(np.uint8)).decode("utf-8").partition("\n")
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.MindRLHFError)) or cls is errors.InputError:
        cls = errors.ConfigError  # InputError's message is already whole; a crash elsewhere is named by its type
    if own:
        traceback.print_exception(err)
    return cls(text)


@contextmanager
def same_verdict(collective: bool):
    """Checks made before the work (often on rank 0 only: outputs exist, the run's template): when any rank's
    check fails, every rank raises the first failing rank's error, so none is left waiting in a later AllGather
    (on one node the launcher would kill it, across nodes it would wait for the cluster timeout). Every rank
    must enter the block; without a collective backend it is a plain block."""
    try:
        yield
    except Exception as err:  # pylint: disable=broad-except  (any failure must reach the other ranks)
        if not collective:
            raise
        agreed = first_error(err)
        if agreed is err:
            raise
        raise agreed from None
    if collective:
        agreed = first_error(None)
        if agreed is not None:
            raise agreed
