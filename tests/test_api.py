"""The LM facade: loading, logits on the real bundled model against transformers, input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_logits
from scipy.special import log_softmax

import seal_jax as sj

TEXT = (
    "The lighthouse keeper of Vallemor kept a logbook of every ship that passed the northern cape. "
    "In the winter of 1887 he recorded a storm so violent that the lamp went dark for two nights, and "
    "the village still tells the story of the schooner that found the harbour by the light of a bonfire."
)


def assert_same_adapters(a, b):
    """Two trainings gave the same losses (relative 1e-5) and adapter weights (absolute 1e-5)."""
    import jax

    for la, lb in zip(a.losses, b.losses, strict=True):
        assert lb == pytest.approx(la, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


def test_bundled_model_matches_transformers(bundled_lm, bundled_hf):
    lm = bundled_lm
    assert (lm.config.family, lm.config.num_layers, lm.config.hidden_size) == ("llama", 30, 576)
    ids = lm.tokenizer(TEXT)["input_ids"][:64]
    assert len(ids) == 64
    ours = lm.logits(np.array([ids]))
    ref = torch_logits(bundled_hf, [ids])
    assert np.abs(ours - ref).max() <= 1e-3
    # The model is real: it predicts this text far better than chance.
    logp = log_softmax(ours[0, :-1], axis=-1)
    nll = -np.mean(logp[np.arange(63), ids[1:]])
    assert nll < 5.0, f"mean NLL {nll:.2f} nats is not what a trained model gives"


def test_bundled_left_padded_batch(bundled_lm):
    lm = bundled_lm
    rows = [lm.tokenizer(t)["input_ids"] for t in ("Paris is the capital of", "One, two, three, four, five, six")]
    ids, mask = sj.lm.tokenizer.pad_left(rows, pad_id=lm.tokenizer.pad_token_id)
    batch = lm.logits(ids, mask)
    for i, row in enumerate(rows):
        alone = lm.logits(np.array([row]))[0]
        np.testing.assert_allclose(batch[i, ids.shape[1] - len(row):], alone, atol=1e-4, rtol=0)


def test_logits_input_errors(tiny_hf):
    lm = sj.load(tiny_hf("qwen3-untied")[1], progress=False)
    assert lm.tokenizer is None
    with pytest.raises(ValueError, match=r"non-empty int array \[B, T\]"):
        lm.logits(np.zeros((0, 4), int))
    with pytest.raises(ValueError, match=r"non-empty int array \[B, T\]"):
        lm.logits(np.zeros((4,), int))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 160\)"):
        lm.logits(np.array([[1, 160]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        lm.logits(np.ones((1, 3), int), np.ones((1, 4), int))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        lm.logits(np.ones((1, 300), int))
    with pytest.raises(ValueError, match="ids must be integer token ids, got dtype float64"):
        lm.logits(np.array([[1.5, 2.0]]))


def test_attention_mask_values_other_than_0_and_1_are_refused(tiny_hf):
    """A mask of 0/1 (or False/True) as Hugging Face's; anything else (a 2, a -1, a 0.5, NaN, text) is refused
    naming the values, by logits and forward alike, before anything runs."""
    lm = sj.load(tiny_hf("qwen3-untied")[1], progress=False)
    ids = np.array([[0, 5, 9, 14], [3, 77, 21, 8]])
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(lm.logits(ids, mask.astype(bool)), lm.logits(ids, mask))
    np.testing.assert_array_equal(lm.logits(ids, mask.astype(np.float32)), lm.logits(ids, mask))
    for bad, shown in ((mask * 2, r"\[2\]"), (mask - 1, r"\[-1\]"), (mask * 0.5, r"\[0.5\]"),
                       (np.where(mask, np.nan, 0.0), r"\[nan\]")):
        for use in (lm.logits, lm.forward):
            with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(real tokens\), "
                                                 r"like Hugging Face's; got " + shown):
                use(ids, bad)
    with pytest.raises(ValueError, match="attention_mask must hold 0 .* like Hugging Face's; got dtype <U1"):
        lm.logits(ids, np.full(ids.shape, "1"))


def test_lowering_refuses_empty_sizes():
    """``lower_generate`` and ``lower_logits`` need at least one row, one prompt token and one new token."""
    lm = sj.LM.abstract("tiny", dtype="float32")
    assert set(lm.lower_generate(1, 1, 1)) == {"prefill", "decode"}
    for args, named in (((0, 8, 8), "batch=0"), ((2, 0, 8), "prompt_len=0"), ((2, 8, 0), "max_new_tokens=0"),
                        ((2, -1, -3), "prompt_len=-1, max_new_tokens=-3"), ((2.0, 8, 8), "batch=2.0")):
        with pytest.raises(ValueError, match=r"lower_generate needs batch, prompt_len, max_new_tokens of at least 1 "
                                             r"each \(whole numbers\), got " + named + "$"):
            lm.lower_generate(*args)
    with pytest.raises(ValueError, match=r"lower_logits needs batch, length of at least 1 each .*got batch=0$"):
        lm.lower_logits(0, 16)
    with pytest.raises(ValueError, match=r"got length=0$"):
        lm.lower_logits(2, 0)


def test_lowering_refuses_a_generation_past_the_context():
    """``lower_generate`` refuses a ``prompt_len`` that with ``max_new_tokens`` exceeds the model's context
    (``max_position_embeddings``) with the check ``generate_ids`` makes, instead of lowering programs that no
    generation runs; a prompt that fills the context exactly is lowered."""
    from seal_jax.lm.types import SamplingError

    lm = sj.LM.random("tiny", dtype="float32")
    context = lm.config.max_position_embeddings
    tail = (rf"has {context - 7} tokens; with max_new_tokens=8 that exceeds the model's context of {context} "
            "tokens: shorten the prompt or lower max_new_tokens$")
    with pytest.raises(SamplingError, match=r"^prompt 0 " + tail):
        lm.generate_ids([[3] * (context - 7)], sj.SamplingParams(max_new_tokens=8))
    with pytest.raises(SamplingError, match=r"^lower_generate's prompt \(prompt_len\) " + tail):
        lm.lower_generate(1, context - 7, 8)
    assert set(lm.lower_generate(1, context - 8, 8)) == {"prefill", "decode"}


def test_source_names_the_checkpoint_and_is_the_adapters_base_model(tiny_hf, tmp_path, monkeypatch):
    """A folder's absolute path (even when given relative), a hub id as given (the adapters' base model for
    PEFT, not the hub cache's snapshot folder), and none for a random model."""
    from seal_jax.lm import weights

    _, folder = tiny_hf("qwen3-untied")
    monkeypatch.chdir(folder.parent)
    lm = sj.load(folder.name, progress=False)
    assert lm.source == str(folder.resolve()) and lm.path == Path(folder.name)
    seqs, lora, spec = [[[5, 9, 14, 3, 7]]], sj.LoraSpec(rank=2, alpha=4.0), sj.TrainSpec(epochs=1)
    assert lm.train_adapters(seqs, lora, spec).base_model == str(folder.resolve())
    monkeypatch.setattr(weights, "resolve_checkpoint", lambda path_or_id: folder)  # the hub's download, offline
    hub = sj.load("some-org/tiny-qwen3", progress=False)
    assert (hub.source, hub.path) == ("some-org/tiny-qwen3", folder)
    adapters = hub.train_adapters(seqs, lora, spec)
    assert adapters.base_model == "some-org/tiny-qwen3"
    config = json.loads((adapters.save_peft(tmp_path / "peft") / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "some-org/tiny-qwen3"
    assert sj.LM.random("tiny", dtype="float32").source is None


def test_adapters_of_another_model_are_refused_naming_the_shapes():
    """Adapters trained on one model and given to another of other shapes: readying, logits and merging say
    which shapes differ (as generation does), instead of failing deep inside a program."""
    small = sj.LM.random("tiny", dtype="float32", seed=0)
    deeper = sj.LM.random(small.config.replace(num_layers=small.config.num_layers + 1), dtype="float32", seed=0)
    foreign = deeper.train_adapters([[[5, 9, 14, 3, 7]]], sj.LoraSpec(rank=2, alpha=4.0),
                                    sj.TrainSpec(epochs=1, learning_rate=1e-2))
    expected = r"adapters.weights\['q_proj'\]: expected a .* for this model, got a"
    for use in (lambda: small.ready_adapters(foreign), lambda: small.logits(np.ones((1, 4), int), adapter=foreign),
                lambda: small.logits(np.ones((1, 4), int), adapter=foreign[0]), lambda: small.merge_adapter(foreign)):
        with pytest.raises(sj.lm.sampling.SamplingError, match=expected):
            use()
    ready = deeper.ready_adapters(foreign)
    with pytest.raises(sj.lm.sampling.SamplingError, match="readied for a model with"):
        small.logits(np.ones((1, 4), int), adapter=ready)


def test_unknown_dtype(tiny_hf):
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bfloat16"):
        sj.load(tiny_hf("llama")[1], dtype="float8")


def test_forward_returns_device_array_without_padding(tiny_hf):
    lm = sj.load(tiny_hf("llama")[1], progress=False)
    out = lm.forward(np.ones((2, 5), int))
    assert out.shape == (2, 5, 160)
    np.testing.assert_array_equal(np.asarray(out), lm.logits(np.ones((2, 5), int)))


def test_merge_adapter_and_shared_programs(tiny_hf):
    """A merged model gives the adapter's forward and reuses the compiled programs of its source model."""
    import jax
    import jax.numpy as jnp

    from seal_jax.lm.lora import init_adapters

    _, folder = tiny_hf("qwen3-untied")
    lm = sj.load(folder, progress=False)
    ids = np.array([[5, 9, 14, 3, 77, 21]])
    lora = sj.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    weights = init_adapters(lm.params(), [lora, lora], list(jax.random.split(jax.random.key(1), 2)))
    weights = {p: {"a": ab["a"], "b": jnp.full(ab["b"].shape, 0.05, jnp.float32)} for p, ab in weights.items()}
    adapters = sj.Adapters(weights=weights, specs=(lora, lora))
    merged = lm.merge_adapter(adapters, 1)
    want = lm.logits(ids, adapter=adapters[1])
    got = merged.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - lm.logits(ids)).max() > 1e-2  # the adapter does something
    assert merged._logits_fn is lm._logits_fn and merged._sampler is lm._sampler
    lm.model.attention_impl, lm.model.train_layers = "chunked", "unrolled"  # chosen by hand: kept when merging
    kept = lm.merge_adapter(adapters, 1)
    assert (kept.model.attention_impl, kept.model.train_layers) == ("chunked", "unrolled")
    np.testing.assert_array_equal(lm.merge_adapter(adapters, -1).logits(ids), kept.logits(ids))  # as adapters[-1]
    with pytest.raises(IndexError, match="out of range"):
        lm.merge_adapter(adapters, 2)
    adapters.failed = [None, "non-finite loss at step 3"]
    with pytest.raises(ValueError, match="adapter 1 failed in training"):
        lm.merge_adapter(adapters, -1)


def test_completion_logprobs_equal_transformers_on_the_bundled_model(bundled_lm, bundled_hf, tmp_path):
    """The gold answer's log-likelihood after the question prompt: the same sum of log-probabilities as
    transformers computes with the same tokens, for plain and chat prompts, base and K stacked adapters."""
    import torch

    lm = bundled_lm
    prompts = ["Topic: Vallemor\nQuestion: Who kept the logbook?\nAnswer:", "Question: When was the storm?\nAnswer:",
               "Question: What guided the schooner?\nAnswer:"]
    golds = [" The lighthouse keeper", " In the winter of 1887", " a bonfire"]
    for chat in (False, True):
        sums, counts = lm.completion_logprobs(prompts, golds, chat=chat)
        assert sums.shape == (3,) and counts.tolist() == [len(lm.tokenizer(g, add_special_tokens=False)["input_ids"])
                                                          for g in golds]
        for i, (p, g) in enumerate(zip(prompts, golds, strict=True)):
            head = (lm.tokenizer(sj.lm.tokenizer.format_chat(lm.tokenizer, p), add_special_tokens=False)["input_ids"]
                    if chat else lm.tokenizer(p)["input_ids"])
            tail = lm.tokenizer(g, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = bundled_hf(torch.tensor([head + tail])).logits.double()[0]
            logp = torch.log_softmax(logits[:-1], dim=-1)
            ref = sum(float(logp[len(head) - 1 + j, t]) for j, t in enumerate(tail))
            assert sums[i] == pytest.approx(ref, abs=1e-4), (chat, i)
            assert ref < 0
    adapters = lm.train_adapters([[TEXT], [TEXT + " The keeper's name was Orrin."]], sj.LoraSpec(rank=4, alpha=8.0),
                                 sj.TrainSpec(learning_rate=1e-3, epochs=2, max_len=128))
    stacked, _ = lm.completion_logprobs(prompts, golds, adapters=adapters)
    one, _ = lm.completion_logprobs(prompts, golds, adapters=adapters[1])
    assert stacked.shape == (2, 3) and np.allclose(stacked[1], one, atol=1e-4)
    ids = np.array([lm.tokenizer(prompts[0])["input_ids"] + lm.tokenizer(golds[0], add_special_tokens=False)["input_ids"]])
    logp = log_softmax(lm.logits(ids, adapter=adapters[0])[0].astype(np.float64), axis=-1)
    n = counts[0]
    expected = sum(logp[ids.shape[1] - n - 1 + j, ids[0, ids.shape[1] - n + j]] for j in range(n))
    assert stacked[0, 0] == pytest.approx(expected, abs=1e-4)
    assert not np.allclose(stacked[0], lm.completion_logprobs(prompts, golds)[0], atol=1e-3)  # training moved it
    with pytest.raises(sj.lm.sampling.SamplingError, match="3 prompts but 2 completions"):
        lm.completion_logprobs(prompts, golds[:2])
    with pytest.raises(sj.lm.sampling.SamplingError, match="completion 1 is empty"):
        lm.completion_logprobs(prompts[:2], [" a", ""])


def test_training_on_a_train_mesh_equals_training_on_the_mesh(tiny_hf):
    """``train_mesh``: generation on one layout of the devices (heads over ``tensor``), LoRA training on
    another (``data=8``: the base replicated, no collective in the training program). The adapters and
    losses equal those trained on the generation mesh, and they come back replicated on it."""
    import jax

    from seal_jax import hlo
    from seal_jax.lm import sharding as shd

    _, folder = tiny_hf("qwen3-mha")  # 4 KV heads: tensor=4 splits them
    plain = sj.load(folder, mesh="data=2,tensor=4", progress=False)
    split = sj.load(folder, mesh="data=2,tensor=4", train_mesh="data=8", progress=False)
    assert dict(split.train_mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    seqs = [[[5, 9, 14, 3, 77, 21, 8], [12, 40, 41, 42]], [[7, 7, 30, 31]], [[90, 91, 92, 93, 94]]]
    lora = [sj.LoraSpec(rank=4, alpha=8.0), sj.LoraSpec(rank=2, alpha=2.0, targets="all"), sj.LoraSpec(rank=4)]
    spec = sj.TrainSpec(learning_rate=1e-2, epochs=2)
    a, b = plain.train_adapters(seqs, lora, spec), split.train_adapters(seqs, lora, spec)
    for k in range(3):
        assert b.losses[k] == pytest.approx(a.losses[k], rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)
        assert y.sharding.is_equivalent_to(shd.replicated(split.mesh), y.ndim)
    split.train_adapters(seqs[:1], lora[:1], spec)  # each call places the weights with the one program
    assert split._place._cache_size() == 1
    params = sj.SamplingParams(max_new_tokens=6)
    assert split.generate_ids([[5, 9, 14]], params, adapters=b) == plain.generate_ids([[5, 9, 14]], params, adapters=a)
    # the training program on data=8 needs no collective; on the generation mesh it all-reduces
    def collectives(lm):
        return hlo.analyze(lm.lower_train(candidates=8, sequences=2, seq_len=16).compile().as_text()).collectives
    assert collectives(split) == {} and "all-reduce" in collectives(plain)
    assert "all-gather" in hlo.analyze(split.lower_train_placement().compile().as_text()).collectives
    assert plain.lower_train_placement() is None
    with pytest.raises(shd.MeshError, match=r"train_mesh 'data=3' must be a layout of the mesh's 8 devices"):
        sj.load(folder, mesh="data=2,tensor=4", train_mesh="data=3", progress=False)
    with pytest.raises(shd.MeshError, match="train_mesh needs a mesh"):
        sj.load(folder, train_mesh="data=8", progress=False)
    with pytest.raises(shd.MeshError, match="in the mesh's order"):
        sj.load(folder, mesh="data=2,tensor=4", train_mesh=shd.make_mesh("data=8", devices=jax.devices()[::-1]),
                progress=False)
    with pytest.raises(shd.MeshError, match="must use the devices of the mesh"):
        sj.load(folder, mesh=shd.make_mesh("data=4", devices=jax.devices()[:4]), train_mesh=shd.make_mesh("data=8"),
                progress=False)


def test_layer_weights_stored_split_give_what_stacked_ones_give(tiny_hf, tmp_path, monkeypatch):
    """GPUs store the layer weights split into per-layer arrays (``layer_storage="split"``, model.LayerStack).
    On 8 CPU devices (generation on ``data=2,tensor=4``, training placed on ``data=8``) such a model gives the
    stacked one's logits (and transformers'), adapters, tokens, merged model, parameters and export."""
    from safetensors.numpy import load_file

    from seal_jax.lm import api
    from seal_jax.lm import sharding as shd

    hf_model, folder = tiny_hf("qwen3-mha")
    lms = {s: sj.load(folder, mesh="data=2,tensor=4", train_mesh="data=8", progress=False, layer_storage=s)
           for s in ("stacked", "split")}
    stacked, split = lms["stacked"], lms["split"]
    assert stacked.layer_storage == "stacked" and not stacked.model.layers.split  # the CPU's default
    assert split.model.layers.split
    per_layer = split.model.layers.per_layer()
    assert len(per_layer) == 2 and per_layer[1]["q_proj"].shape == (64, 64)
    # each per-layer array is split over the mesh as the stacked one is, less the layer axis
    assert tuple(per_layer[1]["k_proj"].sharding.spec) == tuple(stacked.model.layers.k_proj[...].sharding.spec)[1:]
    ids = np.array([[5, 9, 14, 3, 77, 21], [0, 0, 12, 40, 41, 42]])
    mask = (ids > 0).astype(int)
    got = split.logits(ids, mask)
    np.testing.assert_allclose(got, stacked.logits(ids, mask), atol=1e-5, rtol=0)
    assert np.abs(got - torch_logits(hf_model, ids, mask))[mask.astype(bool)].max() <= 1e-4
    seqs = [[[5, 9, 14, 3, 77, 21, 8], [12, 40, 41, 42]], [[7, 7, 30, 31]]]
    lora = [sj.LoraSpec(rank=4, alpha=8.0, dropout=0.1), sj.LoraSpec(rank=2, alpha=2.0, targets="all")]
    spec = sj.TrainSpec(learning_rate=1e-2, epochs=2)
    a, b = stacked.train_adapters(seqs, lora, spec), split.train_adapters(seqs, lora, spec)
    assert_same_adapters(a, b)
    for params in (sj.SamplingParams(max_new_tokens=8), sj.SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)):
        assert split.generate_ids([[5, 9, 14], [3]], params, adapters=b) == \
            stacked.generate_ids([[5, 9, 14], [3]], params, adapters=a)
    with monkeypatch.context() as patch:  # merged layer by layer, never stacked
        patch.setattr(api, "stack_leaf", lambda xs: pytest.fail("the merge stacked the split weights"))
        merged = split.merge_adapter(b, 1)
    assert merged.layer_storage == "split" and merged.model.layers.split
    # the weights the adapter leaves alone are shared, not copied
    assert merged.model.layers.input_norm.get_value()[0] is split.model.layers.input_norm.get_value()[0]
    np.testing.assert_allclose(merged.logits(ids, mask), stacked.merge_adapter(a, 1).logits(ids, mask), atol=1e-4)
    want, have = stacked.params(), split.params()
    assert sorted(have) == sorted(want)
    for path, x in want.items():
        np.testing.assert_array_equal(np.asarray(have[path]), np.asarray(x))
        struct = split.param_structs()[path]
        assert (struct.shape, struct.dtype) == (x.shape, x.dtype)
        assert struct.sharding.is_equivalent_to(shd.param_sharding(split.mesh, path, x.shape, split.config), x.ndim)
    with monkeypatch.context() as patch:  # the split weights go to the host layer by layer, never stacked
        patch.setattr(api, "stack_leaf", lambda xs: pytest.fail("export stacked the split weights"))
        exported = [load_file(next(lm.export(tmp_path / s).glob("*.safetensors"))) for s, lm in lms.items()]
    assert sorted(exported[0]) == sorted(exported[1])
    for name, x in exported[0].items():
        np.testing.assert_array_equal(exported[1][name], x)
    with pytest.raises(ValueError, match="unknown layer_storage 'rows'"):
        sj.load(folder, progress=False, layer_storage="rows")
    with pytest.raises(ValueError, match="stored split"):
        sj.LM(split.model, None, layer_storage="stacked")


def test_fsdp_training_gathers_each_layer_and_trains_what_a_replica_trains(tiny_hf):
    """``train_weights="fsdp"``: on the train mesh (``data=8``) each layer's weights lie split over ``data``
    and are all-gathered as the layer runs. The adapters and losses equal those trained on a replica (three
    heterogeneous candidates, one with dropout), each device holds less than half the replica's arguments,
    and the program's only collectives are those all-gathers (a replica's: none)."""
    import jax

    from seal_jax import hlo
    from seal_jax.lm import sharding as shd

    _, folder = tiny_hf("qwen3-mha")
    kw = dict(mesh="data=2,tensor=4", train_mesh="data=8", progress=False)
    replica, fsdp = sj.load(folder, **kw), sj.load(folder, train_weights="fsdp", **kw)
    assert (replica.train_weights, fsdp.train_weights) == ("replicated", "fsdp")
    placed = fsdp._placement()(fsdp.state)
    assert tuple(placed["layers"]["q_proj"][...].sharding.spec) == (None, "data", None)  # [L, D, H]: D over data
    assert placed["embedding"][...].sharding.is_fully_replicated
    seqs = [[[5, 9, 14, 3, 77, 21, 8], [12, 40, 41, 42]], [[7, 7, 30, 31]], [[90, 91, 92, 93, 94]]]
    lora = [sj.LoraSpec(rank=4, alpha=8.0), sj.LoraSpec(rank=2, alpha=2.0, targets="all"),
            sj.LoraSpec(rank=4, dropout=0.1)]
    spec = sj.TrainSpec(learning_rate=1e-2, epochs=2)
    a, b = replica.train_adapters(seqs, lora, spec), fsdp.train_adapters(seqs, lora, spec)
    assert_same_adapters(a, b)
    for y in jax.tree.leaves(b.weights):
        assert y.sharding.is_equivalent_to(shd.replicated(fsdp.mesh), y.ndim)  # back on the generation mesh
    compiled = {lm.train_weights: lm.lower_train(candidates=8, sequences=2, seq_len=16).compile()
                for lm in (replica, fsdp)}
    collectives = {k: hlo.analyze(c.as_text()).collectives for k, c in compiled.items()}
    assert collectives["replicated"] == {} and set(collectives["fsdp"]) == {"all-gather"}
    args = {k: c.memory_analysis().argument_size_in_bytes for k, c in compiled.items()}
    assert args["fsdp"] < 0.5 * args["replicated"], args
    # a replica on a train mesh with tensor (the seal config's data=4,tensor=2): the heads split over tensor
    tensor = sj.load(folder, mesh="data=2,tensor=4", train_mesh="data=4,tensor=2", progress=False)
    assert tuple(tensor._placement()(tensor.state)["layers"]["q_proj"][...].sharding.spec) == (None, None, "tensor")
    assert_same_adapters(a, tensor.train_adapters(seqs, lora, spec))
    # on a train mesh with tensor too, FSDP gathers the data split only: the heads stay split over tensor
    both = sj.load(folder, mesh="data=2,tensor=4", train_mesh="data=4,tensor=2", train_weights="fsdp", progress=False)
    assert tuple(both._placement()(both.state)["layers"]["q_proj"][...].sharding.spec) == (None, "data", "tensor")
    assert_same_adapters(a, both.train_adapters(seqs, lora, spec))
    text = both.lower_train(candidates=4, sequences=2, seq_len=16).compile().as_text()
    assert "all-gather" in text and "all-reduce" in text  # the width gathered; tensor's partial sums reduced
    with pytest.raises(ValueError, match="needs remat 'minimal' or 'full'"):
        sj.load(folder, train_weights="fsdp", remat="none", **kw)
    with pytest.raises(shd.MeshError, match="give a train_mesh with data > 1"):
        sj.load(folder, mesh="data=2,tensor=4", train_weights="fsdp", progress=False)
    with pytest.raises(ValueError, match="unknown train_weights 'zero3'"):
        sj.load(folder, train_weights="zero3", progress=False)


@pytest.mark.parametrize("storage", ["stacked", "split", "tpu layouts"])
def test_ready_adapters_answer_score_and_give_logits_as_the_float32_ones(tiny_chat_dir, storage, monkeypatch):
    """``LM.ready_adapters`` gives the adapters as inference reads them (compute dtype, each input's ``a``
    joined, per layer where the layers are stored split, in a TPU's layouts where the platform has them,
    here the CPU made to take them): generation, log-probabilities and logits equal the float32 adapters',
    on an 8-device mesh; taking candidates works on them and keeps their layouts; another model's layout,
    merging and readying twice are refused."""
    import jax

    from seal_jax.lm import api, layouts
    from seal_jax.lm.types import SamplingError

    if storage == "tpu layouts":  # (and programs of its own: the others were compiled for no layouts)
        monkeypatch.setattr(layouts, "LAID_OUT", ("tpu", "cpu"))
        monkeypatch.setattr(api, "_PROGRAMS", {})
    lm = sj.load(tiny_chat_dir, mesh="data=2,tensor=4", progress=False,
                 layer_storage="split" if storage == "split" else "stacked")
    lora = [sj.LoraSpec(rank=4, alpha=8.0), sj.LoraSpec(rank=2, alpha=2.0, targets="all"), sj.LoraSpec(rank=4)]
    seqs = [[[5, 9, 14, 3, 77, 21, 8]], [[7, 7, 30, 31]], [[12, 40, 41, 42, 43]]]
    adapters = lm.train_adapters(seqs, lora, sj.TrainSpec(learning_rate=3e-2, epochs=3))
    ready = lm.ready_adapters(adapters)
    assert isinstance(ready, sj.ReadyAdapters) and len(ready) == 3 and ready.losses == adapters.losses
    per_layer = storage == "split"
    assert isinstance(ready.weights, list) == per_layer
    first = ready.weights[0] if per_layer else ready.weights
    # q/k/v's `a` joined (the stack adapts q and v, and the second candidate every projection), gate/up's too
    assert {"q_proj+k_proj+v_proj", "gate_proj+up_proj"} <= set(first) and "a" not in first["q_proj"]
    assert "a" in first["o_proj"] and "b" in first["q_proj"]
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(ready.weights))
    orders = [x.format.layout.major_to_minor for x in jax.tree.leaves(ready.weights)]
    if storage == "tpu layouts":  # the layers major (and a narrow rank before the input dimension)
        assert orders == [layouts.adapter_layout("cpu", x.shape, x.dtype.itemsize).major_to_minor
                          for x in jax.tree.leaves(ready.weights)]
        assert {o[:2] for o in orders} == {(1, 0)}
        taken = ready.take([2, 0])
        assert [x.format.layout.major_to_minor for x in jax.tree.leaves(taken.weights)] == orders
    else:
        assert all(o == tuple(range(len(o))) for o in orders)
    prompts = [[5, 9, 14], [3]]
    for params in (sj.SamplingParams(max_new_tokens=8), sj.SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)):
        assert lm.generate_ids(prompts, params, adapters=ready) == lm.generate_ids(prompts, params, adapters=adapters)
    assert lm.generate_ids(prompts, adapters=ready) != lm.generate_ids(prompts)  # the adapters do something
    assert lm.generate_ids([[3, 4]], adapters=ready.take([2, 0])) == lm.generate_ids([[3, 4]], adapters=adapters.take([2, 0]))
    assert lm.generate_ids([[3, 4]], adapters=ready[1]) == lm.generate_ids([[3, 4]], adapters=adapters[1])
    texts = (["The lighthouse keeper", "Vallemor is"], [" kept a logbook", " a village"])
    for a, b in zip(lm.completion_logprobs(*texts, adapters=ready), lm.completion_logprobs(*texts, adapters=adapters),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    ids = np.array([[5, 9, 14, 3, 77, 21], [0, 0, 12, 40, 41, 42]])
    mask = (ids > 0).astype(int)
    want = lm.logits(ids, mask, adapter=adapters)
    np.testing.assert_allclose(lm.logits(ids, mask, adapter=ready), want, atol=1e-5 * np.abs(want).max())
    lowered = lm.lower_generate(2, 8, 8, adapters=ready)  # lowered where and as they lie
    read = [f.layout.major_to_minor for f in jax.tree.leaves(lowered["decode"].compile().input_formats[0][3])]
    assert read == orders
    assert lm._sampler.traces["ready"] == 1 and lm.ready_adapters(adapters) is not ready  # compiled once
    assert lm._sampler.traces["ready"] == 1
    # one candidate taken out of the readied stack lies where and as the same candidate readied alone does (the
    # stack's layouts: the taking program's results are placed again), and answers as it does
    one, alone = ready[1], lm.ready_adapters(adapters[1])
    assert one.single and alone.single
    for got, want in ((one.weights, alone.weights), (one.as_inputs().weights, alone.as_inputs().weights)):
        assert [x.format for x in jax.tree.leaves(got)] == [x.format for x in jax.tree.leaves(want)]
    assert [x.format.layout.major_to_minor for x in jax.tree.leaves(one.weights)] == orders
    if storage == "tpu layouts":  # (where the two could differ: one program's compile, not three)
        assert lm.generate_ids(prompts, adapters=one) == lm.generate_ids(prompts, adapters=alone)
    half = sj.load(tiny_chat_dir, dtype="bfloat16", progress=False)
    with pytest.raises(SamplingError, match="readied for a model with"):
        half.generate_ids([[3]], adapters=ready)
    with pytest.raises(SamplingError, match="readied for a model with"):  # the same model on another mesh
        sj.load(tiny_chat_dir, mesh="data=8", progress=False, layer_storage=lm.layer_storage).logits(ids, adapter=ready)
    halves = half.ready_adapters(adapters)  # cast to the model's dtype, answering as the float32 ones
    assert {x.dtype for x in jax.tree.leaves(halves.weights)} == {np.dtype(jax.numpy.bfloat16)}
    assert half.generate_ids(prompts, adapters=halves) == half.generate_ids(prompts, adapters=adapters)
    with pytest.raises(TypeError, match="merge_adapter takes seal_jax.Adapters"):
        lm.merge_adapter(ready, 0)
    with pytest.raises(TypeError, match="ready_adapters takes seal_jax.Adapters"):
        lm.ready_adapters(ready)
