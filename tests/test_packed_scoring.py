"""Scoring packed (issue #25, PACKING.md's scoring step): with model_config.packing set, RewardScorer,
reward_infer.py / reward_eval.py (through it) and the server's DynamicBatcher pack their sequences into rows of
seq_length and give the padded path's scores (float32, within 1e-5) on the same weights; the multi-rank split stays
bit-identical to one process; the batcher still isolates a failing request and compiles only the pass row counts.

Fresh (seeded) tiny Llama 2 weights saved as a checkpoint: the comparisons need the same weights, not trained ones.
Each model test runs with MindSpore ops (MINDRLHF_COMPILED_KERNELS=0) and with the compiled kernel, which is
skipped while it does not take the packed mask."""
import json
import time

import numpy as np
import pytest

import mindspore as ms

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli, run_main

PAD, SEQ = 2, 256
def user_attention():
    """What a user's CPU runs: the compiled kernel where a C++ compiler built it, else MindSpore ops. The other
    path's packed-vs-padded equality is tested on the model (tests/test_packed_model.py); scoring adds the
    passes, the batcher and the CLIs on top, the same code on either path."""
    from mindrlhf.kernels import native

    return "kernel" if native.library("cpu_kernels") else "ops"


@pytest.fixture(scope="module", params=[pytest.param("ops", marks=pytest.mark.slow), "kernel"])
def variant(request):
    """The CPU attention every model of a test is built with: MindSpore ops (in make test, not test-fast), then the
    compiled kernel (skipped where no C++ compiler built it: user_attention says which a user gets)."""
    if request.param == "kernel" and user_attention() != "kernel":
        pytest.skip("no compiled kernels here (no C++ compiler, or switched off)")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MINDRLHF_STOCK_KERNELS", raising=False)
        patch.delenv("MINDRLHF_STOCK_SOFTMAX", raising=False)
        patch.delenv("MINDRLHF_COMPILED_KERNELS", raising=False)
        if request.param == "ops":
            patch.setenv("MINDRLHF_COMPILED_KERNELS", "0")
        yield request.param


def write_yaml(path, packing=None, seq_length=SEQ):
    """The tiny CPU YAML, with model_config.packing and seq_length set."""
    text = TINY_CONFIG.read_text(encoding="utf-8")
    assert text.count("    seq_length: 256\n") == 1
    extra = f"    packing: {packing}\n" if packing else ""
    path.write_text(text.replace("    seq_length: 256\n", f"    seq_length: {seq_length}\n{extra}"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint root (rank_0/) of fresh seeded tiny weights; the padded YAML and packed YAMLs beside it."""
    import mindrlhf.training.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    work = tmp_path_factory.mktemp("packed_scoring")
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg["checkpoint_name_or_path"] = ""
    root = work / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    ckpt = root / "rank_0" / "rm_rank_0-1_4.ckpt"
    ms.save_checkpoint(LlamaRewardModel(LlamaConfig(**cfg)), str(ckpt),
                       append_dict={"global_step": ms.Tensor(np.array([4], np.int32))})
    ms.set_context(mode=mode)
    return {"work": work, "root": root, "ckpt": ckpt, "padded": TINY_CONFIG,
            "packed": write_yaml(work / "packed.yaml", "pairs"),
            "shared": write_yaml(work / "shared.yaml", "shared_prefix"),
            "packed_512": write_yaml(work / "packed_512.yaml", "pairs", 512)}


def sequences(count=40, seed=0):
    """Token lists of varied lengths, one of 1 token and one of exactly seq_length."""
    rng = np.random.default_rng(seed)
    lengths = [1, SEQ, 2, 3, SEQ - 1] + rng.integers(4, SEQ, count - 5).tolist()
    return [rng.integers(3, 32000, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def scorers(files, variant):
    """Padded and packed scorers over the same checkpoint, graph mode as the YAML says."""
    from mindrlhf.evaluation.scorer import RewardScorer

    mode = ms.get_context("mode")
    padded = RewardScorer(str(files["padded"]), str(files["ckpt"]), batch_size=8, log=lambda *_: None)
    packed = RewardScorer(str(files["packed"]), str(files["ckpt"]), batch_size=4, log=lambda *_: None)
    assert padded.packing is None and packed.packing == "pairs" and packed.network.packing == "pairs"
    assert packed.network.packed_layout == ("kernel" if variant == "kernel" else "adder")
    assert packed.buckets == [SEQ] and packed.pass_sizes == [1, 2, 4]
    yield {"padded": padded, "packed": packed}
    ms.set_context(mode=mode)


# -- the pass layout (numpy) ------------------------------------------------------------------------------------
def test_packed_passes_use_few_row_counts_and_hold_every_sequence_once():
    from mindrlhf.evaluation.scorer import pass_sizes, packed_passes

    assert pass_sizes(16) == [1, 2, 4, 8, 16] and pass_sizes(6) == [1, 2, 4, 6] and pass_sizes(1) == [1]
    seqs = sequences(60, seed=3)
    for max_rows in (1, 3, 4, 16):
        passes = packed_passes(seqs, max_rows, SEQ, PAD)
        seen = np.concatenate([p["index"] for p in passes])
        assert sorted(seen.tolist()) == list(range(len(seqs)))
        for p in passes:
            rows = p["input_ids"].shape[0]
            assert rows in pass_sizes(max_rows) and p["input_ids"].shape == p["attention_mask"].shape == (rows, SEQ)
            assert p["end_ind"].shape == (rows * SEQ // 2,) and len(p["index"]) <= rows * SEQ // 2
            flat = p["input_ids"].reshape(-1)
            for k, i in enumerate(p["index"]):  # each sequence whole at its flat start, its end at end_ind
                start = p["start"][k]
                assert flat[start:start + len(seqs[i])].tolist() == seqs[i]
                assert p["end_ind"][k] == start + len(seqs[i]) - 1
        # a pass is cut to the fewest rows that hold it: only the last may have fewer than max_rows
        assert all(p["input_ids"].shape[0] == pass_sizes(max_rows)[-1] for p in passes[:-1])
    lone = packed_passes([[5, 6, 7]], 16, SEQ, PAD)  # a lone short request runs 1 row, not 16
    assert len(lone) == 1 and lone[0]["input_ids"].shape == (1, SEQ) and lone[0]["end_ind"].shape == (SEQ // 2,)
    tiny = packed_passes([[9]] * 300, 1, SEQ, PAD)  # 1-token sequences: at most P = 128 a 1-row pass
    assert [len(p["index"]) for p in tiny] == [128, 128, 44]
    # Ascend: a row of k sequences keeps tnd_entries - k filler tokens (actual_seq_len's blocks, none empty)
    capped = packed_passes([[9]] * 300, 2, SEQ, PAD, tnd_entries=16)
    assert sorted(np.concatenate([p["index"] for p in capped]).tolist()) == list(range(300))
    assert max(int((p["attention_mask"] // 8).max()) for p in capped) == 15


# -- RewardScorer ------------------------------------------------------------------------------------------------
def test_packed_scorer_equals_padded_and_splits_bit_identically(files, scorers, variant):
    padded, packed = scorers["padded"], scorers["packed"]
    # texts holding the pad id: refused padded and packed, as training refuses such records (one rule)
    for text in ([1, 40, PAD, 70], [1, 7, 8, PAD]):
        for scorer in (padded, packed):
            with pytest.raises(Exception, match=f"sequence 1: holds pad_token_id {PAD} .*training refuses"):
                scorer.score_ids([[1, 5, 6], text])
    seqs = sequences()
    started = time.monotonic()
    want = padded.score_ids(seqs)
    padded_time = time.monotonic() - started
    started = time.monotonic()
    got = packed.score_ids(seqs)
    packed_time = time.monotonic() - started
    passes = packed.packed_passes(seqs)
    error = float(np.max(np.abs(got - want)))
    print(f"\nPACKED-SCORING {variant}: {len(seqs)} sequences, max |packed - padded| {error:.2e} "
          f"(max |score| {np.abs(want).max():.3f}); {len(passes)} packed passes of rows "
          f"{[p['input_ids'].shape[0] for p in passes]}; padded {padded_time:.1f} s, packed {packed_time:.1f} s "
          "(compiles included)")
    assert np.isfinite(want).all() and np.std(want) > 1e-3  # scores that differ, so a mix-up shows
    assert error <= 1e-5
    assert len(passes) >= 3 and max(len(p["index"]) for p in passes) > 4  # several sequences a row
    few = [0, 2, 3, 7]  # a pass cut to 1 row
    assert [p["input_ids"].shape[0] for p in packed.packed_passes([seqs[i] for i in few])] == [1]
    assert np.max(np.abs(packed.score_ids([seqs[i] for i in few]) - want[few])) <= 1e-5

    # ranks score whole passes: together exactly the one-process scores
    for size in (2, 3):
        shares = [packed.score_ids(seqs, rank, size) for rank in range(size)]
        for rank, share in enumerate(shares):
            mine = np.concatenate([p["index"] for p in passes[rank::size]])
            assert np.isfinite(share[mine]).all() and np.isnan(np.delete(share, mine)).all()
        merged = np.where(np.isnan(shares[0]), 0, shares[0])
        for share in shares[1:]:
            merged = merged + np.where(np.isnan(share), 0, share)
        assert np.array_equal(merged, got), size

    # shared_prefix is a training layout: scoring packs plain sequences all the same
    from mindrlhf.evaluation.scorer import RewardScorer

    shared = RewardScorer(str(files["shared"]), padded.checkpoint, batch_size=4, log=lambda *_: None)
    assert shared.packing == "shared_prefix"
    np.testing.assert_array_equal(shared.score_ids(seqs[:8]), packed.score_ids(seqs[:8]))


def test_ascend_limits_apply_to_the_scorers_passes(scorers, monkeypatch):
    """What RewardScorer sets on FlashAttention (tnd_entries a row and its reserve, rows tnd_entries - 1 wider
    than seq_length, at most tnd_rows_per_call rows a pass), here smaller on the CPU scorer: its passes keep to
    them, a sequence of seq_length tokens still fits, and a text holding the pad id is refused (the TND blocks'
    plain causal spans cannot hide it as the padded scorer does)."""
    from mindrlhf.data.packing import actual_seq_len
    from mindrlhf.errors import ConfigError

    packed = scorers["packed"]
    assert packed.device == "CPU" and packed.tnd_entries is None and packed.max_pass_rows == 4
    assert packed.pass_width == packed.seq_length
    monkeypatch.setattr(packed, "tnd_entries", 4)
    monkeypatch.setattr(packed, "pass_width", packed.seq_length + 3)
    monkeypatch.setattr(packed, "max_pass_rows", 2)
    passes = packed.packed_passes([[5, 6, 7, 8]] * 20 + [[5] * packed.seq_length])
    assert sorted(np.concatenate([p["index"] for p in passes]).tolist()) == list(range(21))
    assert all(p["input_ids"].shape[0] <= 2 and (p["attention_mask"] // 8).max() <= 3 for p in passes)
    for p in passes:
        assert (np.diff(np.r_[0, actual_seq_len(p["attention_mask"], 4).reshape(-1)]) > 0).all()
    with pytest.raises(ConfigError, match=f"sequence 1 holds pad_token_id {PAD}"):
        packed.packed_passes([[5, 6], [5, PAD, 6]])
    from mindrlhf.serving.batcher import DynamicBatcher

    class Planned(Exception):
        pass

    def stop(rows):  # the server's warm-up passes are planned (the CPU model takes no wider rows: stop there)
        assert len(rows[0]) == packed.seq_length and PAD not in rows[0]
        raise Planned()

    batcher = DynamicBatcher(packed, max_batch=2)
    batcher.before_pass = stop
    with pytest.raises(Planned):
        batcher.warmup()


def test_bad_packing_value_names_the_yaml_and_field(files, tmp_path):
    from mindrlhf.errors import ConfigError
    from mindrlhf.evaluation.scorer import RewardScorer

    bad = write_yaml(tmp_path / "bad.yaml", "yes_please")
    with pytest.raises(ConfigError, match=r"bad\.yaml: model\.model_config\.packing: expected false, pairs or "
                                          r"shared_prefix, got 'yes_please'"):
        RewardScorer(str(bad), str(files["ckpt"]))


# -- DynamicBatcher --------------------------------------------------------------------------------------------
def run_jobs(batcher, job_sequences, abandoned=()):
    """Queue every job before the worker starts (one burst: it collects them up to its limit), start it, wait for all.
    Returns each job's scores or exception."""
    jobs = [batcher.submit(seqs) for seqs in job_sequences]
    for k in abandoned:
        jobs[k].abandoned = True
    batcher.start()
    try:
        out = []
        for job in jobs:
            try:
                out.append(job.future.result(timeout=300))
            except Exception as err:  # pylint: disable=broad-except  (the test looks at it)
                out.append(err)
        return out
    finally:
        batcher.stop()


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_batcher_warms_up_its_shapes_and_isolates_a_culprit(scorers, variant, kind, monkeypatch):
    """The same batcher tests over the packed scorer and (unchanged path) the padded one."""
    from mindrlhf.serving.batcher import Abandoned, DynamicBatcher

    scorer = scorers[kind]
    seqs = sequences(24, seed=5)
    want = scorer.score_ids(seqs)

    shapes = []  # (rows, width) of every forward pass
    if kind == "packed":
        score_pass = scorer.score_pass
        monkeypatch.setattr(scorer, "score_pass", lambda p: shapes.append(p["input_ids"].shape) or score_pass(p))
        allowed = [(size, SEQ) for size in (1, 2, 4)]
    else:
        score_batch = scorer.score_batch
        monkeypatch.setattr(scorer, "score_batch", lambda rows: shapes.append(
            (len(rows), scorer.bucket(max(map(len, rows))))) or score_batch(rows))
        allowed = [(size, width) for width in scorer.buckets for size in (1, 4)]
    batcher = DynamicBatcher(scorer, max_batch=4, wait_ms=50)
    assert batcher.packing == (kind == "packed") and batcher.sizes == ([1, 2, 4] if kind == "packed" else [1, 4])
    batcher.warmup()
    assert sorted(shapes) == sorted(allowed)  # one pass of each shape, nothing else to compile

    # 12 jobs of 2 texts, collected into batches of up to 4 sequences (packed: 4 rows' worth of tokens); the pass
    # holding the culprit's text fails: halves are scored again down to the culprit's job alone, every other job
    # gets its scores
    batcher = DynamicBatcher(scorer, max_batch=4, wait_ms=50)
    culprit = seqs[13]
    passes = []

    def before_pass(rows):
        passes.append(len(rows))
        if culprit in rows:
            raise RuntimeError("injected: this row breaks the forward pass")

    batcher.before_pass = before_pass
    shapes.clear()
    results = run_jobs(batcher, [seqs[k:k + 2] for k in range(0, 24, 2)])
    assert 1 <= batcher.counts["collected_batches"] < 12 and batcher.counts["failed_jobs"] == 1
    assert batcher.counts["failed_passes"] == 0 and batcher.counts["rescored_jobs"] > 0
    assert isinstance(results[6], RuntimeError) and "injected" in str(results[6])
    for k, result in enumerate(results):
        if k != 6:
            np.testing.assert_allclose(result, want[2 * k:2 * k + 2], atol=1e-5, rtol=0)
    assert all(shape in allowed for shape in shapes)
    assert (max(passes) > 4) == (kind == "packed")  # packed: several texts a row
    print(f"\nBATCHER {kind} {variant}: {len(passes)} passes (texts {passes}), shapes {shapes}; "
          f"counts {batcher.counts}")

    # a model failing every pass: told from a culprit
    batcher = DynamicBatcher(scorer, max_batch=4, wait_ms=50)
    batcher.before_pass = lambda rows: (_ for _ in ()).throw(RuntimeError("injected: the model is broken"))
    results = run_jobs(batcher, [seqs[k:k + 2] for k in range(0, 6, 2)])
    assert all(isinstance(r, RuntimeError) for r in results)
    # every collected batch failed whole, a lone request's too (the arrival gaps decide how the 3 are collected)
    assert batcher.counts["failed_passes"] == batcher.counts["collected_batches"] >= 1
    assert batcher.counts["failed_jobs"] == 3

    # every request of a batch gave up: give_up is asked before the first pass, nothing is scored
    batcher = DynamicBatcher(scorer, max_batch=4, wait_ms=50)
    shapes.clear()
    results = run_jobs(batcher, [seqs[:3]], abandoned=[0])
    assert isinstance(results[0], Abandoned) and not shapes and batcher.counts["forward_passes"] == 0


def test_server_service_scores_packed(files, scorers, variant):
    """build_service with the packed YAML (warm-up on): /health's info says so, and its rewards for rendered
    texts are the padded scorer's."""
    import asyncio

    from mindrlhf.data.templates import TUTORIAL
    from mindrlhf.serving.app import Limits
    from mindrlhf.serving.server import build_service

    service = build_service(str(files["packed"]), str(files["root"]), str(TOKENIZER), Limits(), max_batch=4,
                            warmup=True)
    try:
        info = service.health()
        assert info["packing"] == "pairs" and info["batch_sizes"] == [1, 2, 4] and info["buckets"] == [SEQ]
        assert info["counts"]["forward_passes"] == 3  # the warm-up: one pass of each row count
        pairs = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()[:6]]
        texts = [TUTORIAL.render(p["prompt"], p[k]) for p in pairs for k in ("pos_resp", "neg_resp")]
        want = scorers["padded"].score_ids(service.encode(texts))
        answer = asyncio.run(service.rewards(texts))
        error = float(np.max(np.abs(np.array(answer["rewards"]) - want)))
        print(f"\nPACKED-SERVICE {variant}: {len(texts)} texts, max |packed - padded| {error:.2e}")
        assert error <= 1e-5 and service.batcher.counts["forward_passes"] > 3
    finally:
        service.batcher.stop()


# -- the CLIs ----------------------------------------------------------------------------------------------------
def test_reward_infer_packed_at_512_gives_the_padded_scores(files, variant, tmp_path):
    """reward_infer.py with packing: pairs and seq_length 512 (a subprocess) against the padded tiny YAML at 256
    (in this process) on rows of at most 256 tokens: the rotary table rows both use are the same."""
    import mindrlhf.training.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.data.templates import TUTORIAL
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    tables = []
    for seq in (SEQ, 512):  # the claim the comparison rests on, checked
        cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
        cfg.pop("type")
        cfg.update(seq_length=seq, checkpoint_name_or_path="")
        mgr = LlamaRewardModel(LlamaConfig(**cfg)).model.freqs_mgr
        tables.append((mgr.freqs_cos.asnumpy(), mgr.freqs_sin.asnumpy()))
    assert np.array_equal(tables[0][0][:SEQ], tables[1][0][:SEQ])
    assert np.array_equal(tables[0][1][:SEQ], tables[1][1][:SEQ])

    tok = load_tokenizer(str(TOKENIZER))
    pairs = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()[:30]]
    ids = TUTORIAL.encode(tok, [p["prompt"] for p in pairs] * 2,
                          [p["pos_resp"] for p in pairs] + [p["neg_resp"] for p in pairs])
    fits = [max(len(ids[i]), len(ids[len(pairs) + i])) <= SEQ for i in range(len(pairs))]
    pairs = [p for p, ok in zip(pairs, fits) if ok][:12]  # neither side truncated at 256
    assert len(pairs) == 12
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    common = ["--data_file", data, "--tokenizer", TOKENIZER, "--distributed_ckpt_path", files["root"]]

    started = time.monotonic()
    run_main(EXAMPLES / "reward_infer.py", "--config", files["padded"], *common, "--output_file",
             tmp_path / "padded.jsonl", "--batch_size", 8)
    padded_time = time.monotonic() - started
    started = time.monotonic()
    proc = run_cli(EXAMPLES / "reward_infer.py", "--config", files["packed_512"], *common, "--output_file",
                   tmp_path / "packed.jsonl", "--batch_size", 4, timeout=600)
    packed_time = time.monotonic() - started
    assert "model.model_config.packing: pairs): rows of 512 tokens, [1, 2, 4] rows a pass" in proc.stdout
    read = lambda name: [json.loads(l)["score"] for l in (tmp_path / name).read_text(encoding="utf-8").splitlines()]
    want, got = np.array(read("padded.jsonl")), np.array(read("packed.jsonl"))
    error = float(np.max(np.abs(got - want)))
    print(f"\nPACKED-CLI {variant}: reward_infer.py {len(want)} texts, max |packed@512 - padded@256| {error:.2e}; "
          f"padded in-process {padded_time:.1f} s, packed subprocess {packed_time:.1f} s")
    assert len(got) == len(want) == 24 and np.std(want) > 1e-3
    assert error <= 1e-5, proc.stdout[-2000:]

    # reward_eval.py (in this process) goes through the same scorer: packed pair batches, the same scores
    scores = {}
    for name in ("padded", "packed_512"):
        run_main(EXAMPLES / "reward_eval.py", "--config", files[name], "--distributed_ckpt_path", files["root"],
                 "--eval_dataset", data, "--tokenizer", TOKENIZER, "--batch_size", 4, "--output_file",
                 tmp_path / f"eval_{name}.json", "--scores_file", tmp_path / f"eval_{name}.jsonl")
        rows = [json.loads(l) for l in (tmp_path / f"eval_{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        scores[name] = np.array([[r["chosen_score"], r["rejected_score"]] for r in rows])
    eval_error = float(np.max(np.abs(scores["packed_512"] - scores["padded"])))
    print(f"PACKED-CLI {variant}: reward_eval.py {len(pairs)} pairs, max |packed@512 - padded@256| {eval_error:.2e}")
    assert eval_error <= 1e-5
    np.testing.assert_allclose(scores["padded"].reshape(-1), want, atol=1e-5, rtol=0)  # eval == infer (pos, neg)
