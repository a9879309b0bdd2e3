"""Dynamic batching: texts of requests that arrive within a few milliseconds are scored in one forward pass.

One worker thread owns the model. It takes the oldest waiting job and keeps collecting the jobs that follow it
less than `wait_ms` apart (at most 4 x wait_ms, or until `max_batch` sequences wait); it sorts all their
sequences by length, cuts them into runs of one length bucket and at most max_batch rows, and scores each run
with RewardScorer.score_batch. Rows are padded to a few fixed batch sizes (1, 4, 16, ..., max_batch) so graph
mode compiles a handful of shapes rather than one per batch size; pad rows are scored and dropped (rows never
attend to each other). A job whose request gave up (timeout) before its turn is skipped, and a batch whose
requests all gave up stops between forward passes, so abandoned work never piles up.

When the scorer packs (model_config.packing), the whole collected list goes to its packed path instead: several
sequences a row of seq_length tokens, passes of at most max_batch rows cut to a few fixed row counts
(powers of 2 below max_batch, and max_batch), each sequence attending only to itself; collecting stops at
max_batch rows' worth of tokens instead of max_batch sequences.

A batch whose scoring raises fails only its culprit: its jobs are split in halves and each half scored again
(recursively), so the requests that did not cause the failure get their scores and the one that did gets the
error (log2 of the batch's jobs extra passes per culprit). A pass in which no request could be scored, alone or
with others (one request or many), is counted as `failed_passes`: the model itself fails. Should the thread itself
die (an error no pass catches), every waiting job gets the error and `thread.is_alive()` says so (/health).
`before_pass(rows)` is called before every forward pass with its real rows (packed: the sequences it holds): tests
use it to inject a failure or hold a pass.
"""
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import List, Sequence

import numpy as np

from mindrlhf.evaluation.scorer import pass_sizes

LOG = logging.getLogger("mindrlhf.serving")


def padded_sizes(max_batch: int) -> List[int]:
    """Batch sizes rows are padded to: powers of 4 below max_batch, and max_batch itself."""
    sizes, size = {max_batch}, 1
    while size < max_batch:
        sizes.add(size)
        size *= 4
    return sorted(sizes)


class Job:  # pylint: disable=too-few-public-methods
    """abandoned: the request stopped waiting (timeout); its remaining forward passes are not run."""

    __slots__ = ("sequences", "future", "abandoned")

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.sequences = sequences
        self.future: Future = Future()
        self.abandoned = False


class Abandoned(Exception):
    """Every request of a batch stopped waiting for it."""


class DynamicBatcher:
    """submit(token id lists) -> Future of a float32 array of their rewards, in order."""

    def __init__(self, scorer, max_batch: int = 32, wait_ms: float = 5.0):
        self.scorer = scorer
        self.max_batch = max(1, int(max_batch))
        self.wait = max(0.0, float(wait_ms)) / 1000.0
        self.packing = bool(getattr(scorer, "packing", None))
        self.sizes = pass_sizes(self.max_batch) if self.packing else padded_sizes(self.max_batch)
        self.jobs: "queue.Queue" = queue.Queue()  # bounded by the server's limit on requests in flight
        self.counts = {"forward_passes": 0, "sequences": 0, "collected_batches": 0, "skipped_jobs": 0,
                       "failed_jobs": 0, "rescored_jobs": 0, "failed_passes": 0}
        self.before_pass = None  # callable(rows) before each forward pass (tests: inject a failure, hold a pass)
        self.thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)

    def start(self) -> "DynamicBatcher":
        """Start the worker thread (again, if it died)."""
        if self.thread.ident is not None and not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0):
        self.jobs.put(None)
        self.thread.join(timeout)

    def submit(self, sequences: Sequence[Sequence[int]]) -> Job:
        """Queue token id lists; the job's future gets their rewards. Set job.abandoned when giving up."""
        job = Job(sequences)
        self.jobs.put(job)
        return job

    def warmup(self):
        """Compile every (batch size, bucket) shape (packed: every pass's row count) now instead of on the first
        request that needs it."""
        pad = self.scorer.pad_token_id
        if self.packing:  # not the pad id: packed scoring on FlashAttention refuses texts holding it
            token = 1 if pad == 0 else 0
            for size in self.sizes:  # size full rows: one pass of exactly `size` rows
                self.score([[token] * self.scorer.seq_length] * size)
            return
        for width in self.scorer.buckets:
            for size in self.sizes:
                self.scorer.score_batch([[pad] * width] * size)

    def score(self, sequences: Sequence[Sequence[int]], give_up=lambda: False) -> np.ndarray:
        """Rewards for these sequences (already truncated to seq_length): sorted, bucketed, padded rows.

        give_up() is asked before each forward pass; True raises Abandoned."""
        self.scorer.check_pad_rule(sequences)
        if self.packing:
            return self._score_packed(sequences, give_up)
        scores = np.zeros(len(sequences), np.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        start = 0
        while start < len(order):
            if give_up():
                raise Abandoned()
            width = self.scorer.bucket(len(sequences[order[start]]))
            stop = start
            while stop < len(order) and stop - start < self.max_batch \
                    and self.scorer.bucket(len(sequences[order[stop]])) == width:
                stop += 1
            rows = [sequences[i] for i in order[start:stop]]
            if self.before_pass is not None:
                self.before_pass(rows)
            size = next(s for s in self.sizes if s >= len(rows))
            rows += [[self.scorer.pad_token_id]] * (size - len(rows))
            scores[order[start:stop]] = self.scorer.score_batch(rows)[:stop - start]
            self.counts["forward_passes"] += 1
            start = stop
        self.counts["sequences"] += len(sequences)
        return scores

    def _score_packed(self, sequences: Sequence[Sequence[int]], give_up) -> np.ndarray:
        """score() when the scorer packs: the scorer's packed passes of at most max_batch rows."""
        scores = np.zeros(len(sequences), np.float32)
        for packed in self.scorer.packed_passes(sequences, self.max_batch):
            if give_up():
                raise Abandoned()
            if self.before_pass is not None:
                self.before_pass([sequences[i] for i in packed["index"]])
            scores[packed["index"]] = self.scorer.score_pass(packed)
            self.counts["forward_passes"] += 1
        self.counts["sequences"] += len(sequences)
        return scores

    def _size(self, job: Job) -> int:
        """What a job adds to a collected batch: its sequences, or (packed) its tokens."""
        if self.packing:
            return sum(min(len(seq), self.scorer.seq_length) for seq in job.sequences)
        return len(job.sequences)

    def _collect(self, first: Job) -> list:
        """The first job plus every job that follows it with gaps under wait_ms (at most 4 x wait_ms in all),
        up to max_batch sequences (packed: max_batch rows' worth of tokens): a burst of requests whose parsing
        takes a while still lands in one batch, and a lone request waits wait_ms."""
        jobs, waiting = [first], self._size(first)
        now = time.monotonic()
        last_arrival, give_up = now, now + 4 * self.wait
        limit = self.max_batch * self.scorer.seq_length if self.packing else self.max_batch
        while waiting < limit:
            remaining = min(last_arrival + self.wait, give_up) - time.monotonic()
            try:
                job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: score what was collected, then end
                self.jobs.put(None)
                break
            jobs.append(job)
            waiting += self._size(job)
            last_arrival = time.monotonic()
        return jobs

    def _run(self):
        jobs = []
        try:
            while True:
                first = self.jobs.get()
                if first is None:
                    return
                collected = self._collect(first)
                jobs = [job for job in collected if job.future.set_running_or_notify_cancel()]
                self.counts["skipped_jobs"] += len(collected) - len(jobs)
                if not jobs:
                    continue
                self.counts["collected_batches"] += 1
                answers = []
                if not self._score_jobs(jobs, answers):
                    # no request of the pass could be scored, alone or with others: the model fails, not a request
                    LOG.error("every one of %d request(s) of a pass failed, each alone too: the model itself fails "
                              "(see the errors above)", len(jobs))
                    self.counts["failed_passes"] += 1
                # answered only now, once counted: a client that reads /health after its answer sees its pass
                for job, scores, err in answers:
                    if err is None:
                        job.future.set_result(scores)
                    else:
                        job.future.set_exception(err)
                jobs = []
        except BaseException as err:  # pylint: disable=broad-except  (the thread ends: nobody may wait for it)
            LOG.critical("the batcher thread stopped: %s: %s", type(err).__name__, err)
            stopped = RuntimeError(f"the batcher thread stopped: {type(err).__name__}: {err}")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(stopped)
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(stopped)

    def _score_jobs(self, jobs: list, answers: list) -> int:
        """Score these jobs in one go; when that raises, each half again, down to the job that fails alone.
        Appends (job, scores, None) or (job, None, error) to answers, for the caller to deliver once it has
        counted the pass. Returns how many jobs got their scores."""
        sequences = [seq for job in jobs for seq in job.sequences]
        try:
            scores = self.score(sequences, lambda: all(job.abandoned for job in jobs))
        except Abandoned as err:
            self.counts["skipped_jobs"] += len(jobs)
            answers.extend((job, None, err) for job in jobs)
            return len(jobs)  # given up by their clients, not failed
        except Exception as err:  # pylint: disable=broad-except  (answer every waiting request, keep serving)
            if len(jobs) > 1:
                LOG.warning("a pass over %d requests failed (%s: %s); scoring them again in halves to find the "
                            "culprit", len(jobs), type(err).__name__, err)
                self.counts["rescored_jobs"] += len(jobs)
                half = len(jobs) // 2
                return self._score_jobs(jobs[:half], answers) + self._score_jobs(jobs[half:], answers)
            LOG.exception("scoring failed for one request (%d texts)", len(jobs[0].sequences))
            self.counts["failed_jobs"] += 1
            answers.append((jobs[0], None, err))
            return 0
        start = 0
        for job in jobs:
            answers.append((job, scores[start:start + len(job.sequences)], None))
            start += len(job.sequences)
        return len(jobs)
