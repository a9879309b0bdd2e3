"""Hugging Face in and out, checked against transformers itself: tests/data/hf_models holds a tiny Llama 3.1
(GQA, rope_type llama3) and a tiny Qwen2.5 (GQA, q/k/v biases, tied embeddings) reward model as transformers 5
saves them, their config.json as transformers 4 writes it, and transformers' own scores of six token rows
(make_fixtures.py). Import (convert_weight.py) must give our reward model transformers' scores, and export
(export_hf.py) must give back transformers' tensors and config keys: a mapping wrong both ways fails one of them.
No torch or transformers 5 is needed here."""
import json
import shutil

import numpy as np
import pytest
import yaml

from mindrlhf.errors import ConfigError

from conftest import DATA, ROOT, SCRIPTS, TINY_CONFIG, TOKENIZER, run_cli, run_killed

HF_MODELS = DATA / "hf_models"
RECORD = json.loads((HF_MODELS / "scores.json").read_text())
CONVERT, EXPORT = SCRIPTS / "convert_weight.py", SCRIPTS / "export_hf.py"
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# our run YAML for each fixture: the family's tiny CPU config with the fixture's sizes
MODELS = {
    "llama3_1": (ROOT / "model_configs" / "llama3_config" / "run_llama_3_tiny_rm_cpu.yaml",
                 {"vocab_size": 256, "intermediate_size": 128, "num_heads": 4, "n_kv_heads": 2,
                  "extend_method": "LLAMA3", "scaling_factor": SCALING}),
    "qwen2_5": (ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_tiny_rm_cpu.yaml",
                {"vocab_size": 256, "intermediate_size": 128}),
}


def write_yaml(path, name, **changes):
    base, sizes = MODELS[name]
    raw = yaml.safe_load(base.read_text(encoding="utf-8"))
    raw["model"]["model_config"].update(sizes, **changes)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def hf_config(name, legacy=False):
    """config.json of a fixture as transformers 5 wrote it, or (legacy) as transformers 4 writes it."""
    path = HF_MODELS / "legacy" / f"{name}.json" if legacy else HF_MODELS / name / "config.json"
    return json.loads(path.read_text())


def legacy_folder(tmp_path, name):
    """The fixture's weights beside its config.json in transformers 4's layout."""
    folder = tmp_path / f"{name}_v4"
    folder.mkdir()
    shutil.copyfile(HF_MODELS / name / "model.safetensors", folder / "model.safetensors")
    shutil.copyfile(HF_MODELS / "legacy" / f"{name}.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module", params=sorted(MODELS))
def imported(request, tmp_path_factory):
    """A fixture converted as convert_weight.py does (its CLI runs in the next test) with its run YAML: shapes,
    theta and scaling checked."""
    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.training.config import load_config

    name = request.param
    work = tmp_path_factory.mktemp(name)
    config = write_yaml(work / "run.yaml", name)
    ckpt = work / "checkpoint" / f"{name}.ckpt"
    result = convert_hf_to_ms(str(HF_MODELS / name), str(ckpt), load_config(str(config)).model.model_config,
                              log=lambda *_: None)
    assert result["tied_embeddings"] == (name == "qwen2_5") and result["dropped"] == []
    return {"name": name, "work": work, "config": config, "ckpt": ckpt}


# -- item 5: both config layouts -------------------------------------------------------------------------------
def test_rope_settings_are_read_from_both_layouts():
    from mindrlhf.interop.hf_import import hf_model_config, hf_rope

    expected = {"llama3_1": (500000.0, dict(SCALING, rope_type="llama3")), "qwen2_5": (1000000.0, None)}
    for name, (theta, scaling) in expected.items():
        new, old = hf_config(name), hf_config(name, legacy=True)
        assert "rope_theta" not in new and "rope_parameters" in new and "rope_parameters" not in old
        assert hf_rope(new, name) == hf_rope(old, name) == (theta, scaling)
        assert hf_model_config(new)["theta"] == theta
        assert hf_model_config(new).get("scaling_factor") == (SCALING if scaling else None)
    # Llama 3.1 with original_max_position_embeddings at the top level (as some configs carry it)
    top = dict(hf_config("llama3_1"), original_max_position_embeddings=16)
    top["rope_parameters"] = {k: v for k, v in top["rope_parameters"].items()
                              if k != "original_max_position_embeddings"}
    assert hf_rope(top, "x")[1] == dict(SCALING, rope_type="llama3")
    both = dict(hf_config("qwen2_5"), rope_theta=10000.0)  # the two layouts disagree: never guess
    with pytest.raises(ConfigError, match=r"cfg.json: rope_theta 10000.0 and rope_parameters.rope_theta 1000000.0 "
                                          r"disagree"):
        hf_rope(both, "cfg.json")
    with pytest.raises(ConfigError, match=r"cfg.json: rope_scaling None and rope_parameters \{.*'rope_type': "
                                          r"'llama3'\} disagree"):
        hf_rope(dict(hf_config("llama3_1"), rope_scaling=None), "cfg.json")


def test_transformers_5_folders_convert_with_their_rope_and_are_refused_with_another(tmp_path):
    """Before: a Qwen2 folder of transformers 5 (theta 1e6 only inside rope_parameters) was refused against a
    YAML saying 1e6, and converted silently against one saying 10000; Llama 3.1's scaling was not seen."""
    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.training.config import load_config

    bad = write_yaml(tmp_path / "bad.yaml", "qwen2_5", theta=10000.0)
    proc = run_cli(CONVERT, "--input_path", HF_MODELS / "qwen2_5", "--output_path", tmp_path / "bad.ckpt",
                   "--config", bad, check=False)
    assert proc.returncode == 2 and not (tmp_path / "bad.ckpt").exists()
    assert f"{HF_MODELS / 'qwen2_5' / 'config.json'}: rope_theta is 1000000.0 but the target config's " \
        "model_config.theta is 10000.0" in proc.stderr, proc.stderr[-2000:]
    for name, wrong in (("qwen2_5", {"theta": 10000.0}), ("llama3_1", {"extend_method": "None"})):
        base, sizes = MODELS[name]
        model_config = dict(load_config(str(base)).model.model_config, **sizes)
        for folder in (HF_MODELS / name, legacy_folder(tmp_path, name)):  # transformers 5's layout, then 4's
            out = tmp_path / f"{folder.name}.ckpt"
            convert_hf_to_ms(str(folder), str(out), model_config, log=lambda *_: None)
            assert out.is_file()
            with pytest.raises(ConfigError, match="rope_theta is 1000000.0 but" if name == "qwen2_5"
                               else r"rope_scaling is Llama 3.1's \(\{'factor': 8.0, 'low_freq_factor': 1.0, "
                                    r"'high_freq_factor': 4.0, 'original_max_position_embeddings': 16\}\)"):
                convert_hf_to_ms(str(folder), str(tmp_path / "bad.ckpt"), dict(model_config, **wrong),
                                 log=lambda *_: None)
            assert not (tmp_path / "bad.ckpt").exists()


# -- item 6: import and export against transformers ------------------------------------------------------------
def test_imported_models_score_as_transformers(imported):
    """Our reward model (the scorer of eval/infer/serve, with the CPU kernels) on the converted weights gives
    the scores transformers computed on its own folder; the weights' layout matters (kv heads swapped: off)."""
    import mindspore as ms

    from mindrlhf.evaluation.scorer import RewardScorer
    from mindrlhf.kernels import native

    scorer = RewardScorer(str(imported["config"]), str(imported["ckpt"]), log=lambda *_: None)
    if native.library("cpu_kernels"):
        assert sum(hasattr(cell, "rope_attention") for _, cell in scorer.network.cells_and_names()) == 2
    ours = scorer.score_ids(RECORD["rows"])
    theirs = np.array(RECORD["scores"][imported["name"]])
    print(f"{imported['name']}: max |ours - transformers| = {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert np.abs(theirs).max() > 0.5  # scores large enough for the tolerance to mean something
    # the check can tell a wrong GQA mapping: the two kv heads of layer 0 swapped
    for param in scorer.network.get_parameters():
        if param.name in ("model.layers.0.attention.wk.weight", "model.layers.0.attention.wv.weight"):
            value = param.asnumpy()
            param.set_data(ms.Tensor(np.concatenate([value[16:], value[:16]])))
    assert np.abs(scorer.score_ids(RECORD["rows"]) - theirs).max() > 1e-2


def test_export_gives_back_what_transformers_wrote(imported):
    from safetensors.numpy import load_file

    from mindrlhf.serving.share import export_run

    name = imported["name"]
    out = imported["work"] / "hf"  # as export_hf.py does (its CLI runs in the --overwrite test)
    result = export_run(str(imported["config"]), str(imported["ckpt"]), str(TOKENIZER), str(out), log=lambda *_: None)
    assert result["tensors"] == (27 if name == "qwen2_5" else 21)
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(HF_MODELS / name / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for tensor, value in theirs.items():
        assert ours[tensor].dtype == value.dtype and ours[tensor].shape == value.shape, tensor
        np.testing.assert_array_equal(ours[tensor], value, err_msg=tensor)
    config = json.loads((out / "config.json").read_text())
    # every key either transformers version wrote, with its value (5.x: rope_parameters, 4.x: rope_theta and
    # rope_scaling), so both read the export as the model it is
    for written in (hf_config(name), hf_config(name, legacy=True)):
        for key, value in written.items():
            if key != "transformers_version":
                assert key in config and config[key] == value, (key, config.get(key), value)
    assert set(config) - set(hf_config(name)) - set(hf_config(name, legacy=True)) <= {"torch_dtype", "num_labels"}

    from transformers import AutoConfig  # .venv's transformers 4.x reads the 4.x keys

    loaded = AutoConfig.from_pretrained(str(out))
    assert loaded.rope_theta == (500000.0 if name == "llama3_1" else 1000000.0)
    assert loaded.rope_scaling == (dict(SCALING, rope_type="llama3") if name == "llama3_1" else None)


def test_extend_methods_without_a_hugging_face_equivalent_are_refused():
    from mindrlhf.interop.hf_folder import hf_config as export_config
    from mindrlhf.training.config import load_config

    base, sizes = MODELS["llama3_1"]
    model_config = dict(load_config(str(base)).model.model_config, **sizes)
    with pytest.raises(ConfigError, match="extend_method 'YARN'"):
        export_config(dict(model_config, extend_method="YARN", scaling_factor={"factor": 4.0}))


# -- item 3: --overwrite deletes only an earlier export --------------------------------------------------------
def test_overwrite_replaces_an_earlier_export_and_nothing_else(tmp_path):
    """export_hf.py --overwrite on a folder of the user's: exit 2, nothing touched (before: deleted). An earlier
    export (our marker, only the files it lists) is replaced; one with a file of the user's added is not."""
    from mindrlhf.errors import OutputExistsError
    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.serving.share import export_run
    from mindrlhf.tools.tiny_hf import tiny_hf_tensors, write_hf
    from mindrlhf.training.config import load_config

    config = TINY_CONFIG  # the Llama 2 tutorial's tiny model, from the random Llama of mindrlhf.tools.tiny_hf
    ckpt = tmp_path / "checkpoint" / "llama2.ckpt"
    tensors = dict(tiny_hf_tensors(), **{"score.weight": np.full((1, 64), 0.01, np.float32)})  # a reward model
    convert_hf_to_ms(str(write_hf(tmp_path / "tiny-hf", tensors)), str(ckpt),
                     load_config(str(config)).model.model_config, log=lambda *_: None)

    def export_here(out, overwrite=True):
        return export_run(str(config), str(ckpt), str(TOKENIZER), str(out), overwrite=overwrite, log=lambda *_: None)

    user = tmp_path / "my_models"  # a folder of the user's, with a file in it
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    proc = run_cli(EXPORT, "--config", config, "--distributed_ckpt_path", ckpt, "--tokenizer", TOKENIZER,
                   "--output_dir", user, "--overwrite", check=False)
    assert proc.returncode == 2 and f"error: {user} has no mindrlhf_export.json of an earlier mindrlhf export: " \
        "refusing to delete it even with --overwrite" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(OutputExistsError, match="has no mindrlhf_export.json"):  # never suggests --overwrite for it
        export_here(user, overwrite=False)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    lone_file = tmp_path / "rm-hf"
    lone_file.write_text("mine")
    with pytest.raises(OutputExistsError, match="is not a folder an export wrote"):
        export_here(lone_file)
    assert lone_file.read_text() == "mine"

    out = tmp_path / "export"
    export_here(out, overwrite=False)
    marker = json.loads((out / "mindrlhf_export.json").read_text())
    assert marker["written_by"] == "mindrlhf" and marker["checkpoint"] == str(ckpt) and marker["mindrlhf_version"]
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != "mindrlhf_export.json")
    first = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="pass --overwrite"):  # an earlier export too needs --overwrite
        export_here(out, overwrite=False)
    export_here(out)  # and is replaced with it
    assert (out / "model.safetensors").stat().st_size > 1000 and (out / "model.safetensors").stat().st_mtime_ns != first
    # the user fine-tunes the export and saves it into the same folder (save_pretrained rewrites our files)
    (out / "config.json").write_text((out / "config.json").read_text().replace('"num_labels": 1', '"num_labels":1'))
    with pytest.raises(OutputExistsError, match=r"\['config.json'\] changed since the earlier export wrote them"):
        export_here(out)
    assert '"num_labels":1' in (out / "config.json").read_text()
    export_here(tmp_path / "export2")  # a fresh export to go on with
    out = tmp_path / "export2"
    (out / "eval_notes.md").write_text("mine")  # a file of the user's added to an export: kept
    with pytest.raises(OutputExistsError, match=r"holds \['eval_notes.md'\], which the earlier export"):
        export_here(out)
    assert (out / "eval_notes.md").read_text() == "mine" and (out / "model.safetensors").stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp-*"))


def whole_export(folder):
    """The dtype of the export in folder when it is whole (every file its marker lists, as written, and no other),
    else None."""
    try:
        marker = json.loads((folder / "mindrlhf_export.json").read_text())
    except (OSError, ValueError):
        return None
    files = marker["files"]
    if sorted(p.name for p in folder.iterdir()) != sorted([*files, "mindrlhf_export.json"]):
        return None
    if any({"size": (folder / n).stat().st_size, "mtime_ns": (folder / n).stat().st_mtime_ns} != files[n]
           for n in files):
        return None
    return json.loads((folder / "config.json").read_text())["torch_dtype"]


@pytest.mark.parametrize("point", ["replaced_folder:exchanged", "replaced_folder:aside"])
def test_a_kill_during_overwrite_leaves_the_old_export_or_the_new_one(tmp_path, point):
    """export_hf.py --overwrite (a float16 export over a float32 one) killed during the swap: the new export is
    whole at its place once the folders are exchanged; on a file system without exchange (forced here) a kill
    between the two renames leaves the old export whole under a hidden name. Before: the old export was deleted
    first, and a kill then left neither."""
    from mindrlhf.io import NO_EXCHANGE
    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.serving.share import export_run
    from mindrlhf.tools.tiny_hf import tiny_hf_tensors, write_hf
    from mindrlhf.training.config import load_config

    ckpt = tmp_path / "checkpoint" / "llama2.ckpt"
    tensors = dict(tiny_hf_tensors(), **{"score.weight": np.full((1, 64), 0.01, np.float32)})
    convert_hf_to_ms(str(write_hf(tmp_path / "tiny-hf", tensors)), str(ckpt),
                     load_config(str(TINY_CONFIG)).model.model_config, log=lambda *_: None)
    out = tmp_path / "export"
    export_run(str(TINY_CONFIG), str(ckpt), str(TOKENIZER), str(out), dtype="float32", log=lambda *_: None)
    run_killed(EXPORT, point, "--config", TINY_CONFIG, "--distributed_ckpt_path", ckpt, "--tokenizer", TOKENIZER,
               "--output_dir", out, "--dtype", "float16", "--overwrite",
               env={NO_EXCHANGE: "1"} if point == "replaced_folder:aside" else None)
    if point == "replaced_folder:aside":
        aside = list(tmp_path.glob(".export.tmp-*.old"))
        assert not out.exists() and len(aside) == 1 and whole_export(aside[0]) == "float32"
    else:
        staged = list(tmp_path.glob(".export.tmp-*"))  # the old export, exchanged into the staging name
        assert whole_export(out) == "float16" and len(staged) == 1 and whole_export(staged[0]) == "float32"
