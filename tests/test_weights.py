"""Safetensors loading (single file, sharded index), checks with named errors, export round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_hf_model, torch_logits
from safetensors.numpy import load_file, save_file

import seal_jax as sj
from seal_jax.lm.config import from_hf
from seal_jax.lm.weights import WeightsError, hf_names, hf_target, load_params, resolve_checkpoint


def _copy(folder, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    return out


def test_name_table_covers_every_transformers_tensor(tiny_hf):
    for name in ("qwen3-untied", "llama"):
        model, folder = tiny_hf(name)
        expected = set(hf_names(from_hf(folder)))
        assert expected == set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert hf_target("model.layers.7.mlp.down_proj.weight").layer == 7
    assert hf_target("model.layers.7.mlp.down_proj.weight").transposed
    assert hf_target("something.else") is None


def test_sharded_checkpoint_with_index(tmp_path):
    model = make_hf_model("qwen3", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    lm = sj.load(tmp_path, progress=False)
    ids = np.arange(24).reshape(2, 12) % 160
    np.testing.assert_allclose(lm.logits(ids), torch_logits(model, ids), atol=1e-4, rtol=0)


def test_missing_tensor_is_named(tiny_hf, tmp_path):
    folder = _copy(tiny_hf("qwen3-untied")[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing tensors: \['model.layers.1.self_attn.k_norm.weight'\]"):
        sj.load(folder, progress=False)


def test_wrong_shape_names_both_shapes(tiny_hf, tmp_path):
    folder = _copy(tiny_hf("qwen3-untied")[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.up_proj.weight has shape \[95, 64\], the config needs \[96, 64\]"):
        sj.load(folder, progress=False)


def test_unexpected_tensor_is_named(tiny_hf, tmp_path):
    folder = _copy(tiny_hf("llama")[1], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected tensors: \['model.layers.0.self_attn.q_proj.bias'\]"):
        sj.load(folder, progress=False)


def test_index_pointing_to_missing_shard(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(WeightsError, match="model-00002-.*missing"):
        sj.load(tmp_path, progress=False)


def test_folder_without_weights(tmp_path, tiny_hf):
    shutil.copy(tiny_hf("llama")[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        sj.load(tmp_path, progress=False)


def test_folder_with_pytorch_bin_weights_says_to_convert_them(tmp_path, tiny_hf):
    """A folder with PyTorch's pytorch_model.bin (no safetensors): seal-jax does not read it (no torch
    dependency) and the error says so and how to convert it; a sharded one names its index too."""
    import torch

    model, folder = tiny_hf("llama")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"holds PyTorch .bin weights \(pytorch_model.bin\) and no safetensors; "
                       r"seal-jax reads safetensors only \(it has no torch dependency\).*save_pretrained\("
                       r".*safe_serialization=True\)"):
        sj.load(tmp_path, progress=False)
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"\(pytorch_model-00001-of-00001.bin, pytorch_model.bin.index.json\)"):
        sj.load(tmp_path, progress=False)
    (tmp_path / "training_args.bin").write_bytes(b"")  # a Trainer's file beside safetensors is no PyTorch model
    for f in tmp_path.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(WeightsError, match="no model.safetensors.*is this a Hugging Face model folder"):
        sj.load(tmp_path, progress=False)


def test_hub_model_with_pytorch_bin_weights_says_to_convert_them(tmp_path, monkeypatch, tiny_hf):
    """A hub repo whose weights are PyTorch .bin files (one pytorch_model.bin, or shards and their index):
    the download takes no .bin (it would only be refused), and the error names the repo's files and says how
    to convert them from the hub id into a folder, where it called the download no Hugging Face model folder
    (one file) or suggested converting the download, which lacks the shards (sharded). Offline, the index
    the download holds names a sharded checkpoint; a download with safetensors is not listed."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(tiny_hf("llama")[1] / "config.json", snapshot / "config.json")
    listing = ["config.json", "pytorch_model.bin", "tokenizer.json", "original/pytorch_model.bin"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(snapshot))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: listing)
    with pytest.raises(WeightsError, match=r"^the hub's 'some-org/old-model' holds PyTorch .bin weights "
                       r"\(pytorch_model.bin\) and no safetensors; seal-jax reads safetensors only \(it has no torch "
                       r"dependency\)\. Convert them once with transformers: AutoModelForCausalLM\.from_pretrained\("
                       r"'some-org/old-model'\)\.save_pretrained\(DIR, safe_serialization=True\), and its tokenizer "
                       r"with AutoTokenizer\.from_pretrained\('some-org/old-model'\)\.save_pretrained\(DIR\); then "
                       r"load DIR$"):
        sj.load("some-org/old-model", progress=False)
    shards = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    listing[1:2] = shards
    (snapshot / "pytorch_model.bin.index.json").write_text("{}")  # (a *.json: the download takes it)
    with pytest.raises(WeightsError, match=r"^the hub's 'some-org/old-model' holds PyTorch .bin weights \("
                       + ", ".join(shards).replace(".", r"\.") + r"\).*from_pretrained\('some-org/old-model'\)"):
        resolve_checkpoint("some-org/old-model")

    def offline(repo_id):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(WeightsError, match=r"^the hub's 'some-org/old-model' holds PyTorch .bin weights "
                                           r"\(pytorch_model\.bin\.index\.json\)"):
        resolve_checkpoint("some-org/old-model")
    (snapshot / "pytorch_model.bin.index.json").unlink()
    assert resolve_checkpoint("some-org/old-model") == snapshot  # nothing to name: loading says what is missing
    (snapshot / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", None)  # (not called)
    assert resolve_checkpoint("some-org/old-model") == snapshot


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*seal-jax fetch"):
        sj.load(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist, relative to the current directory"):
        resolve_checkpoint("./relative/missing")


def test_a_typo_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder 'checkpoints/smollm2-135m-instrct' does not exist"):
        resolve_checkpoint("checkpoints/smollm2-135m-instrct")


def test_hub_id_offline_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError,
                       match=r"'Qwen/Qwen3-0.6B' is not a local folder and could not be downloaded.*offline.*pass its path"):
        resolve_checkpoint("Qwen/Qwen3-0.6B")


@pytest.mark.parametrize("name", ["qwen3-untied", "llama"])
def test_export_round_trip_through_transformers(tiny_hf, tmp_path, name):
    from transformers import AutoModelForCausalLM

    model, folder = tiny_hf(name)
    lm = sj.load(folder, progress=False)
    out = lm.export(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(3).integers(0, 160, (2, 9))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-6, rtol=0)
    np.testing.assert_allclose(sj.load(out, progress=False).logits(ids), lm.logits(ids), atol=1e-6, rtol=0)


def test_export_writes_the_source_folders_generation_config(tiny_hf, tmp_path):
    """The folder's generation_config.json (eos/bos/pad ids, sampling defaults) is written again by export,
    also for a model merged from it, so transformers' generate on the export stops where the source's does;
    a folder without one exports none, and a broken one is a warning naming the file."""
    import jax
    from transformers import GenerationConfig

    from seal_jax.lm.lora import init_adapters

    folder = _copy(tiny_hf("llama")[1], tmp_path)
    generation = {"bos_token_id": 2, "eos_token_id": [1, 7], "pad_token_id": 0, "do_sample": True, "temperature": 0.6}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    lm = sj.load(folder, progress=False)
    assert lm.generation_config == generation
    out = lm.export(tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text()) == generation
    read = GenerationConfig.from_pretrained(out)
    assert (read.eos_token_id, read.bos_token_id, read.pad_token_id, read.temperature) == ([1, 7], 2, 0, 0.6)
    lora = sj.LoraSpec(rank=2, alpha=4.0)
    adapters = sj.Adapters(weights=init_adapters(lm.params(), [lora], [jax.random.key(0)]), specs=(lora,))
    merged = lm.merge_adapter(adapters, 0)
    assert json.loads((merged.export(tmp_path / "merged") / "generation_config.json").read_text()) == generation
    (folder / "generation_config.json").unlink()
    bare = sj.load(folder, progress=False)
    assert bare.generation_config is None and not (bare.export(tmp_path / "bare") / "generation_config.json").exists()
    (folder / "generation_config.json").write_text("{'eos_token_id': 1}")  # damaged: the model still loads
    with pytest.warns(UserWarning, match=r"generation_config.json is not valid JSON .*an export of this model leaves it out"):
        assert sj.load(folder, progress=False).generation_config is None
    (folder / "generation_config.json").write_text("[1]")
    with pytest.warns(UserWarning, match=r"generation_config.json must hold a JSON object, got list"):
        assert sj.load(folder, progress=False).generation_config is None


def test_export_without_a_generation_config_removes_an_earlier_exports(tiny_hf, tmp_path):
    """A model without a generation config exported into a folder that holds an earlier export's
    ``generation_config.json`` removes that file (transformers would otherwise stop and sample by another
    model's ids and defaults there); the other files beside the export stay, and so does a damaged one."""
    folder = _copy(tiny_hf("llama")[1], tmp_path)
    generation = {"bos_token_id": 2, "eos_token_id": [1, 7], "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    out = sj.load(folder, progress=False).export(tmp_path / "export")
    assert json.loads((out / "generation_config.json").read_text()) == generation
    (out / "notes.txt").write_text("mine")
    (folder / "generation_config.json").unlink()
    bare = sj.load(folder, progress=False)
    assert bare.generation_config is None and bare.export(out) == out
    assert not (out / "generation_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert sj.load(out, progress=False).generation_config is None
    # a damaged one (which loading warned about, saying to fix it) is the user's to mend: it stays
    (out / "generation_config.json").write_text("{not json")
    bare.export(out)
    assert (out / "generation_config.json").read_text() == "{not json"


def test_export_refuses_dtypes_transformers_cannot_read_and_abstract_models(tiny_hf, tmp_path):
    _, folder = tiny_hf("llama")
    lm = sj.load(folder, progress=False)
    for bad in ("int8", "foo", np.int32):
        with pytest.raises(ValueError, match=r"cannot export weights as dtype .*choose one of \['float32', 'bfloat16', 'float16'\]"):
            lm.export(tmp_path / "bad", dtype=bad)
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    out = lm.export(tmp_path / "half", dtype="float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    abstract = sj.LM.abstract(lm.config)
    with pytest.raises(ValueError, match="export needs weights, and this LM is abstract"):
        abstract.export(tmp_path / "abstract")
    assert not (tmp_path / "abstract").exists()


def test_export_in_shards(tiny_hf, tmp_path, capsys):
    from seal_jax.lm.weights import export_hf, hf_names

    _, folder = tiny_hf("qwen3-tied")
    lm = sj.load(folder, progress=False)
    out = export_hf(lm.params(), lm.config, tmp_path / "sharded", max_shard_bytes=30_000, progress=True)
    n = len(hf_names(lm.config))
    assert f"exporting to {out}" in capsys.readouterr().err and len(json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]) == n  # a bar over the n tensors
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    ids = np.arange(10)[None]
    np.testing.assert_allclose(sj.load(out, progress=False).logits(ids), lm.logits(ids), atol=0)


def test_load_params_places_shards_on_a_mesh(tiny_hf):
    from seal_jax.lm.sharding import make_mesh

    _, folder = tiny_hf("qwen3-untied")
    params = load_params(folder, from_hf(folder), mesh=make_mesh("fsdp=4,tensor=2"), progress=False)
    q = params["layers.q_proj"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 16, 32)


def test_loading_holds_about_one_tensor_in_host_memory(tmp_path):
    import tracemalloc

    model = make_hf_model("llama", num_hidden_layers=8, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=512)
    model.save_pretrained(tmp_path)
    sizes = [p.numel() * 4 for p in model.state_dict().values()]
    cfg = from_hf(tmp_path)
    load_params(tmp_path, cfg, progress=False)  # compile the placement programs first
    tracemalloc.start()
    load_params(tmp_path, cfg, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(sizes) > 20 * max(sizes)
    assert peak < 4 * max(sizes), f"peak host memory {peak} bytes for tensors of at most {max(sizes)} bytes"


def test_random_weights_are_the_same_on_any_mesh_and_placed_by_the_rules():
    from seal_jax.lm.config import preset
    from seal_jax.lm.params import param_shapes
    from seal_jax.lm.sharding import make_mesh, param_sharding
    from seal_jax.lm.weights import RANDOM_STD, random_params

    config = preset("tiny")
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    alone = random_params(config, dtype="float32", seed=7)
    sharded = random_params(config, dtype="float32", mesh=mesh, seed=7)
    other = random_params(config, dtype="float32", seed=8)
    assert set(alone) == set(param_shapes(config))
    for path, x in alone.items():
        assert x.shape == param_shapes(config)[path]
        assert sharded[path].sharding == param_sharding(mesh, path, x.shape, config), path
        np.testing.assert_array_equal(np.asarray(sharded[path]), np.asarray(x))
        values = np.asarray(x)
        if path.endswith("norm"):
            np.testing.assert_array_equal(values, 1.0)
        else:
            assert abs(values.std() - RANDOM_STD) < 0.1 * RANDOM_STD and abs(values.mean()) < 0.1 * RANDOM_STD, path
            assert not np.array_equal(values, np.asarray(other[path])), path
    # tensors are not copies of each other, and rows are not repeats
    assert not np.allclose(np.asarray(alone["layers.q_proj"])[0, :, :64], np.asarray(alone["layers.k_proj"])[0])
    q = np.asarray(alone["layers.q_proj"])
    assert len(np.unique(q)) > 0.9 * q.size


def test_random_lm_generates_and_trains_without_a_tokenizer():
    lm = sj.LM.random("tiny", dtype="float32", mesh="data=2,fsdp=4")
    assert lm.tokenizer is None and lm.dtype == np.float32
    out = lm.generate_ids([[5, 6, 7], [8, 9]], sj.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [len(r) for r in out] == [4, 4]
    adapters = lm.train_adapters([[[5, 6, 7, 8, 9]], [[10, 11, 12]]], sj.LoraSpec(rank=2, alpha=4.0),
                                 sj.TrainSpec(epochs=1))
    assert all(np.isfinite(h[0]) for h in adapters.losses)


def test_creating_a_2b_parameter_random_model_adds_no_host_copy():
    """The weights are made in their shards by one program: the process grows by the weights (on a CPU
    the devices' memory is the host's) and by nothing more than 1 GB on the way."""
    import subprocess
    import sys

    code = """
import re
import jax, numpy as np
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
def high_water_mark():  # VmHWM starts afresh at exec (getrusage's maxrss would include the forked parent)
    return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024
jax.numpy.zeros(1).block_until_ready()
import seal_jax as sj
base = rss()
lm = sj.LM.random('qwen3-1.7b', dtype='bfloat16')
jax.block_until_ready(lm.params())
weights = sum(x.nbytes for x in lm.params().values())
params = sum(int(np.prod(x.shape)) for x in lm.params().values())
print(base, high_water_mark(), weights, params)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    base, peak, weights, params = map(int, out.stdout.split()[-4:])
    assert params > 1e9
    assert peak - base - weights < 1e9, (f"creating {params / 1e9:.2f}B parameters ({weights / 1e9:.2f} GB) raised "
                                         f"the peak by {(peak - base) / 1e9:.2f} GB")
