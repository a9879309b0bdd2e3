"""LoRA reward models out to Hugging Face, merged and as PEFT adapters, checked against peft itself:
tests/data/hf_models/peft holds LoRA adapters peft wrote onto the tiny Llama 3.1 and Qwen2.5 fixtures of
test_hf_interop.py, with peft's scores (make_fixtures.py --peft). Importing peft's adapter must give peft's scores
with our LoRA scorer; exporting it again must give peft's keys, shapes, bytes and config; the merged export must be
W + B.A.alpha/r computed here on peft's own tensors and score as our LoRA model does. A name mapping wrong both
ways fails against peft's files. No torch or peft is needed here."""
import json
import re
import shutil

import numpy as np
import pytest

from mindrlhf.errors import ConfigError

from conftest import SCRIPTS, TOKENIZER, run_cli
from test_hf_interop import HF_MODELS, RECORD, write_yaml

PEFT = HF_MODELS / "peft"
PEFT_RECORD = json.loads((PEFT / "scores.json").read_text())
EXPORT = SCRIPTS / "export_hf.py"
PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}


def quiet(*_):
    pass


@pytest.fixture(scope="module", params=["llama3_1", "qwen2_5"])
def lora_run(request, tmp_path_factory):
    """peft's adapter read onto the converted fixture base and saved as a LoRA run's checkpoint (frozen base,
    LoRA tensors, value head), beside the run's LoRA YAML and the plain YAML of the same model."""
    import mindspore as ms

    from mindrlhf.checkpoints import adapters
    from mindrlhf.model import lora
    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.interop.peft import peft_onto_base, read_peft_adapter
    from mindrlhf.training.config import load_config

    name = request.param
    work = tmp_path_factory.mktemp(f"lora_{name}")
    plain, config = write_yaml(work / "plain.yaml", name), write_yaml(work / "lora.yaml", name, pet_config=PET)
    base = work / "base.ckpt"
    convert_hf_to_ms(str(HF_MODELS / name), str(base), load_config(str(plain)).model.model_config, log=quiet)
    tensors, settings, _ = read_peft_adapter(str(PEFT / name))
    assert (settings["rank"], settings["alpha"], settings["dropout"]) == (4, 8.0, 0.0)
    assert settings["targets"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    assert adapters.same_settings(settings, lora.lora_settings(load_config(str(config)).model.model_config))
    params, _ = peft_onto_base(str(PEFT / name), str(base))  # the adapter's head replaces the base's score head
    ckpt = work / "checkpoint" / "rank_0" / "lora.ckpt"
    ckpt.parent.mkdir(parents=True)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in sorted(params.items())], str(ckpt))
    return {"name": name, "work": work, "plain": plain, "config": config, "base": base, "ckpt": ckpt,
            "tensors": tensors, "record": PEFT_RECORD["models"][name]}


def scores(config, ckpt):
    from mindrlhf.evaluation.scorer import RewardScorer

    return RewardScorer(str(config), str(ckpt), log=quiet).score_ids(PEFT_RECORD["rows"])


def test_peft_adapter_scores_as_peft(lora_run):
    """Our LoRA scorer (LoRADense layers, strict load: every name must be the network's own) on peft's adapter
    gives peft's scores; without the LoRA tensors (the adapter's head alone) it does not."""
    record = lora_run["record"]
    ours = scores(lora_run["config"], lora_run["ckpt"])
    print(f"{lora_run['name']}: max |ours - peft| = {np.abs(ours - record['scores']).max():.2e}")
    np.testing.assert_allclose(ours, record["scores"], rtol=0, atol=1e-4)
    assert PEFT_RECORD["rows"] == RECORD["rows"]
    assert min(abs(a - b) for a, b in zip(record["scores"], record["base_scores"])) > 0.1


def test_peft_export_gives_back_what_peft_wrote(lora_run):
    """export_hf.py --peft of that checkpoint: peft's keys, shapes and bytes, and adapter_config.json keys with
    peft's values (target_modules in any order; modules_to_save ["score"], which peft extends when it loads)."""
    from safetensors.numpy import load_file

    name, out = lora_run["name"], lora_run["work"] / "peft_out"
    run_cli(EXPORT, "--config", lora_run["config"], "--distributed_ckpt_path", lora_run["ckpt"], "--tokenizer",
            TOKENIZER, "--output_dir", out, "--peft", "--base_model", f"../../{name}")
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = load_file(str(PEFT / name / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs) == sorted(lora_run["record"]["tensors"])
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    written = lora_run["record"]["adapter_config"]
    assert set(config) <= set(written), set(config) - set(written)
    for key, value in config.items():
        if key == "target_modules":
            assert sorted(value) == sorted(written[key])
        elif key == "modules_to_save":
            assert value == ["score"] and "score" in written[key]
        else:
            assert value == written[key], (key, value, written[key])
    marker = json.loads((out / "mindrlhf_export.json").read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != "mindrlhf_export.json")
    assert marker["base_model"] == f"../../{name}"


def test_merged_export_is_w_plus_ba_and_scores_as_the_lora_model(lora_run):
    """The merged folder: every adapted weight W + B.A.alpha/r from the fixture base and peft's tensors (computed
    here), everything else the base's, score.weight the adapter's; imported back (convert_weight.py) it scores as
    our LoRA model (<= 1e-5) and as peft's merged model (<= 1e-4)."""
    from safetensors.numpy import load_file

    from mindrlhf.interop.hf_import import convert_hf_to_ms
    from mindrlhf.serving.share import export_run
    from mindrlhf.training.config import load_config

    name, work = lora_run["name"], lora_run["work"]
    out = work / "merged"
    result = export_run(str(lora_run["config"]), str(lora_run["ckpt"]), str(TOKENIZER), str(out), log=quiet)
    assert result["lora_merged"] and result["tensors"] == (27 if name == "qwen2_5" else 21)
    merged, base = load_file(str(out / "model.safetensors")), load_file(str(HF_MODELS / name / "model.safetensors"))
    adapter = load_file(str(PEFT / name / "adapter_model.safetensors"))
    assert sorted(merged) == sorted(base)
    changed = 0
    for key, value in base.items():
        stem = "base_model.model." + key[:-len("weight")]
        if stem + "lora_A.weight" in adapter:
            a, b = (adapter[stem + f"lora_{x}.weight"].astype(np.float64) for x in "AB")
            value = (value.astype(np.float64) + b @ a * (8 / 4)).astype(np.float32)
            changed += 1
        elif key == "score.weight":
            value = adapter["base_model.model.score.weight"]
        np.testing.assert_allclose(merged[key], value, rtol=0, atol=1e-6, err_msg=key)
    assert changed == 14
    assert json.loads((out / "mindrlhf_export.json").read_text())["lora_merged"] == {
        "rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}

    back = work / "merged_back.ckpt"
    convert_hf_to_ms(str(out), str(back), load_config(str(lora_run["plain"])).model.model_config, log=quiet)
    plain_scores, lora_scores = scores(lora_run["plain"], back), scores(lora_run["config"], lora_run["ckpt"])
    print(f"{name}: merged vs LoRA {np.abs(plain_scores - lora_scores).max():.2e}")
    np.testing.assert_allclose(plain_scores, lora_scores, rtol=0, atol=1e-5)
    np.testing.assert_allclose(plain_scores, lora_run["record"]["merged_scores"], rtol=0, atol=1e-4)


def test_lora_tensors_are_never_dropped_silently(lora_run, tmp_path):
    """A LoRA checkpoint exported with a YAML that has no pet_config: exit 2, nothing written (before: the frozen
    base alone was exported). One whose pet_config has another rank: refused too. --peft without --base_model, or
    of a checkpoint without LoRA: refused."""
    from mindrlhf.serving.share import export_run

    proc = run_cli(EXPORT, "--config", lora_run["plain"], "--distributed_ckpt_path", lora_run["ckpt"], "--tokenizer",
                   TOKENIZER, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "holds 28 LoRA tensors" in proc.stderr and "has no pet_config to give their " \
        "lora_alpha" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    other = write_yaml(tmp_path / "r8.yaml", lora_run["name"], pet_config=dict(PET, lora_rank=8))
    with pytest.raises(ConfigError, match=r"have rank 4, the YAML's model_config pet_config.lora_rank is 8; is the "
                                          r"YAML's lora_rank the run's"):
        export_run(str(other), str(lora_run["ckpt"]), str(TOKENIZER), str(tmp_path / "out"), log=quiet)
    wq_only = write_yaml(tmp_path / "wq.yaml", lora_run["name"], pet_config=dict(PET, target_modules=".*wq"))
    with pytest.raises(ConfigError, match=r"has LoRA on \[.*'wv'\], the YAML's model_config pet_config.target_modules "
                                          r"'\.\*wq' names \['wq'\]"):
        export_run(str(wq_only), str(lora_run["ckpt"]), str(TOKENIZER), str(tmp_path / "out"), log=quiet)
    with pytest.raises(ConfigError, match="--base_model is required"):
        export_run(str(lora_run["config"]), str(lora_run["ckpt"]), str(TOKENIZER), str(tmp_path / "out"),
                   form="peft", log=quiet)
    import mindspore as ms

    from mindrlhf.checkpoints.reader import load_checkpoint_dict
    from mindrlhf.interop.peft import peft_onto_base

    narrow = load_checkpoint_dict(str(lora_run["base"]))  # a base whose o_proj is narrower than the adapter's
    narrow["model.layers.1.attention.wo.weight"] = ms.Parameter(narrow["model.layers.1.attention.wo.weight"][:, :32],
                                                                name="model.layers.1.attention.wo.weight")
    ms.save_checkpoint(list(narrow.values()), str(tmp_path / "narrow.ckpt"))
    with pytest.raises(ConfigError, match=r"layers.1.self_attn.o_proj.lora_A.weight \(4, 64\) and .* do not fit "
                                          r"model.layers.1.attention.wo.weight \(64, 32\)"):
        peft_onto_base(str(PEFT / lora_run["name"]), str(tmp_path / "narrow.ckpt"))
    with pytest.raises(ConfigError, match="holds no LoRA tensors"):  # the converted base (its score head too)
        export_run(str(lora_run["config"]), str(lora_run["base"]), str(TOKENIZER), str(tmp_path / "out"),
                   form="peft", base_model="x", log=quiet)
    assert not (tmp_path / "out").exists()


def test_scoring_merging_and_export_check_lora_tensors_alike(lora_run, tmp_path):
    """A YAML whose lora_rank is not the checkpoint's: the scorer, the adapter tool's extract and the export refuse
    it with one check's words, naming the file and the tensors (before: two checks; the scorer's named no tensor)."""
    from mindrlhf.evaluation.scorer import RewardScorer
    from mindrlhf.model import lora
    from mindrlhf.checkpoints.adapters import extract
    from mindrlhf.serving.share import export_run
    from mindrlhf.training.config import load_config

    if lora_run["name"] != "llama3_1":
        pytest.skip("one model is enough for the checks")
    config = write_yaml(tmp_path / "r8.yaml", lora_run["name"], pet_config=dict(PET, lora_rank=8))
    ckpt = str(lora_run["ckpt"])
    settings = lora.lora_settings(load_config(str(config)).model.model_config)
    readers = {"scorer": lambda: RewardScorer(str(config), ckpt, log=quiet),
               "extract": lambda: extract(ckpt, settings, str(config), merged=str(tmp_path / "m.ckpt"), log=quiet),
               "export": lambda: export_run(str(config), ckpt, str(TOKENIZER), str(tmp_path / "hf"), log=quiet)}
    for name, read in readers.items():
        with pytest.raises(ConfigError) as err:
            read()
        assert re.match(re.escape(ckpt) + r": model\.layers\.0\.attention\.wk\.mindpet_delta_lora_a \(4, 64\) and "
                        r"model\.layers\.0\.attention\.wk\.mindpet_delta_lora_b \(\d+, 4\) have rank 4, .* "
                        r"pet_config\.lora_rank is 8", str(err.value)), (name, str(err.value))
    assert not (tmp_path / "m.ckpt").exists() and not (tmp_path / "hf").exists()


def test_lora_tensors_that_miss_a_layer_or_do_not_fit_their_weight_are_refused():
    """With the model's shapes (export, merge): every target projection of every layer, A (r, in), B (out, r)."""
    from mindrlhf.checkpoints import adapters, names

    settings = {"rank": 2, "alpha": 4.0, "target_modules": ".*wq", "targets": ["wq"]}
    shapes = {f"model.layers.{i}.attention.wq.weight": (8, 6) for i in (0, 1)}
    dims = {f"model.layers.{i}.attention.wq.{names.LORA_A}": (2, 6) for i in (0, 1)}
    dims.update({f"model.layers.{i}.attention.wq.{names.LORA_B}": (8, 2) for i in (0, 1)})
    adapters.check_lora_tensors("run.ckpt", dims, settings, "the YAML", shapes)
    one_layer = {n: d for n, d in dims.items() if ".1." not in n}
    with pytest.raises(ConfigError, match=r"run.ckpt: LoRA tensors on 1 projections, the YAML pet_config's targets "
                                          r"\['wq'\] name 2 in the model \(e.g. \['model.layers.1.attention.wq"):
        adapters.check_lora_tensors("run.ckpt", one_layer, settings, "the YAML", shapes)
    wide = dict(dims, **{f"model.layers.1.attention.wq.{names.LORA_A}": (2, 7)})
    with pytest.raises(ConfigError, match=r"run.ckpt: model.layers.1.attention.wq.mindpet_delta_lora_a \(2, 7\) "
                                          r"and .* do not fit model.layers.1.attention.wq.weight \(8, 6\)"):
        adapters.check_lora_tensors("run.ckpt", wide, settings, "the YAML", shapes)
    lone_b = {n: d for n, d in dims.items() if n != f"model.layers.1.attention.wq.{names.LORA_A}"}
    with pytest.raises(ConfigError, match=r"run.ckpt: model.layers.1.attention.wq.mindpet_delta_lora_b has no "):
        adapters.check_lora_tensors("run.ckpt", lone_b, settings, "the YAML")


def test_base_plus_adapter_exports_as_the_lora_checkpoint(lora_run, tmp_path):
    """Base weights + --adapter (a mindrlhf adapter file) give the same folders, byte for byte, as the LoRA run's
    checkpoint; onto other base weights the adapter is refused; --overwrite replaces an earlier PEFT export and
    never a folder of the user's."""
    from mindrlhf.errors import OutputExistsError
    from mindrlhf.checkpoints import adapters
    from mindrlhf.model import lora
    from mindrlhf.checkpoints.reader import weights_identity
    from mindrlhf.checkpoints.reader import load_checkpoint_dict
    from mindrlhf.serving.share import export_run
    from mindrlhf.training.config import load_config

    if lora_run["name"] != "llama3_1":
        pytest.skip("one model is enough for the file plumbing")
    config, ckpt = str(lora_run["config"]), str(lora_run["ckpt"])
    settings = lora.lora_settings(load_config(config).model.model_config)
    tensors, meta = adapters.adapter_arrays(load_checkpoint_dict(ckpt), settings, weights_identity(ckpt), "base.ckpt")
    adapter = tmp_path / "adapter.safetensors"
    adapters.write_adapter(str(adapter), tensors, meta)
    for form, weights in (("merged", "model.safetensors"), ("peft", "adapter_model.safetensors")):
        extra = {"base_model": "../../llama3_1"} if form == "peft" else {}
        export_run(config, ckpt, str(TOKENIZER), str(tmp_path / f"{form}_a"), form=form, log=quiet, **extra)
        export_run(str(lora_run["plain"]), str(lora_run["base"]), str(TOKENIZER), str(tmp_path / f"{form}_b"),
                   form=form, adapter=str(adapter), log=quiet, **extra)
        assert (tmp_path / f"{form}_a" / weights).read_bytes() == (tmp_path / f"{form}_b" / weights).read_bytes()
    other = tmp_path / "other_base.ckpt"  # the same shapes, one weight changed
    import mindspore as ms

    params = load_checkpoint_dict(str(lora_run["base"]))
    params["model.norm_out.weight"] = ms.Parameter(params["model.norm_out.weight"] * 2, name="model.norm_out.weight")
    ms.save_checkpoint(list(params.values()), str(other))
    with pytest.raises(ConfigError, match="belongs to other base weights"):
        export_run(config, str(other), str(TOKENIZER), str(tmp_path / "x"), adapter=str(adapter), log=quiet)

    out = tmp_path / "peft_a"
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        export_run(config, ckpt, str(TOKENIZER), str(out), form="peft", base_model="b", log=quiet)
    export_run(config, ckpt, str(TOKENIZER), str(out), form="peft", base_model="b", overwrite=True, log=quiet)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "b"
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"holds \['notes.md'\], which the earlier export"):
        export_run(config, ckpt, str(TOKENIZER), str(out), form="peft", base_model="b", overwrite=True, log=quiet)
    assert (out / "notes.md").read_text() == "mine"


def test_peft_configs_beyond_plain_lora_are_refused(tmp_path):
    from mindrlhf.interop.peft import HF_MODULES, ms_key, peft_key, read_peft_adapter

    assert HF_MODULES == {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                          "w2": "down_proj", "w3": "up_proj"}
    for key in PEFT_RECORD["models"]["llama3_1"]["tensors"]:
        assert peft_key(ms_key(key)) == key
    written = json.loads((PEFT / "llama3_1" / "adapter_config.json").read_text())
    for change, message in (({"use_rslora": True}, "use_rslora is True"), ({"use_dora": True}, "use_dora"),
                            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                            ({"target_modules": "all-linear"}, "target_modules 'all-linear'"),
                            ({"target_modules": ["q_proj", "lm_head"]}, r"\['lm_head'\] are not among"),
                            ({"modules_to_save": None}, "lacks 'score'"), ({"task_type": "CAUSAL_LM"}, "SEQ_CLS"),
                            ({"target_modules": ["q_proj"]},
                             r"LoRA tensors on \[.*'up_proj'.*\], .* names \['q_proj'\]")):
        folder = tmp_path / "a"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copyfile(PEFT / "llama3_1" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(dict(written, **change)))
        with pytest.raises(ConfigError, match=message):
            read_peft_adapter(str(folder))


def test_a_lora_network_of_the_tiny_lora_yaml_exports_merged_and_as_peft(tmp_path):
    """The tiny Llama 2 LoRA YAML's own network (rank 8, alpha 16; random non-zero A and B, as training leaves
    them), saved as training saves it (Adam moments beside): merged, each adapted weight is W + B.A.alpha/r of its
    tensors and nothing else changes; as PEFT, read back, its tensors are the network's own."""
    import mindspore as ms
    from safetensors.numpy import load_file

    from mindrlhf.evaluation.scorer import RewardScorer
    from mindrlhf.checkpoints import names
    from mindrlhf.model import lora
    from mindrlhf.interop.hf_folder import ms_to_hf_name
    from mindrlhf.interop.peft import read_peft_adapter
    from mindrlhf.serving.share import export_run

    from conftest import ROOT

    config = ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_lora_rm_cpu.yaml"
    network = RewardScorer(str(config), log=quiet).network
    rng = np.random.default_rng(0)
    params = {}
    for param in network.get_parameters():
        value = param.asnumpy()
        if names.is_lora(param.name):
            value = rng.normal(0, 0.3, param.shape).astype(np.float32)
        params[param.name] = value
    assert sum(names.is_lora(n) for n in params) == 28
    ckpt = tmp_path / "checkpoint" / "rank_0" / "lora.ckpt"
    ckpt.parent.mkdir(parents=True)
    saved = dict(params, **{f"adam_m.{n}": np.ones_like(v) for n, v in params.items() if names.trains(n)})
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in saved.items()], str(ckpt))
    export_run(str(config), str(ckpt), str(TOKENIZER), str(tmp_path / "merged"), log=quiet)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert len(merged) == 21
    for name, value in params.items():
        if names.is_lora(name):
            continue
        stem = name[:-len("weight")]
        if stem + names.LORA_A in params:
            a, b = params[stem + names.LORA_A].astype(np.float64), params[stem + names.LORA_B].astype(np.float64)
            value = (value + b @ a * 2.0).astype(np.float32)
        np.testing.assert_allclose(merged[ms_to_hf_name(name)], value, rtol=0, atol=1e-6, err_msg=name)
    export_run(str(config), str(ckpt), str(TOKENIZER), str(tmp_path / "peft"), form="peft", base_model="b",
               log=quiet)
    tensors, settings, _ = read_peft_adapter(str(tmp_path / "peft"))
    assert (settings["rank"], settings["alpha"]) == (8, 16.0)
    assert sorted(tensors) == sorted(n for n in params if names.trains(n))
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)
