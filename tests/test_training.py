"""The LoRA inner loop against PEFT + torch AdamW, and K heterogeneous candidates in one program."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from conftest import make_hf_model
from flax import nnx

import seal_jax as sj
from seal_jax.lm import attention as attn
from seal_jax.lm.lora import LoraSpec
from seal_jax.lm.training import (
    TrainError,
    TrainSpec,
    data_layout,
    initial_adapters,
    lr_at,
    make_plan,
    tokenize,
    train_adapters,
    training_memory,
)

EOS, PAD = 1, 0


class CharTokenizer:
    """A character tokenizer for the tiny random models (ids 5..154)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 + (ord(c) % 150) for c in text]}


TOK = CharTokenizer()
TEXTS = ["the river Oss flows north", "Kalvi was founded in 1712", "its mayor is Ena Droll", "bridges: 4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_hf_model("qwen3", seed=11)
    folder = tmp_path_factory.mktemp("train-model")
    model.save_pretrained(folder)
    return model, sj.load(folder, progress=False)


def train(lm, sequences, lora, spec, seed=0):
    return train_adapters(lm.graphdef, lm.state, lm.params(), TOK, sequences, lora, spec, seed=seed,
                          eos_id=EOS, pad_id=PAD)


def peft_reference(hf_model, hf_params, texts, lora: LoraSpec, spec: TrainSpec, seed=0):
    """Train the same adapter with HF PEFT and torch AdamW over the same plan (order, accumulation, lr)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets)))
    init = jax.tree.map(np.asarray, initial_adapters(hf_params, [lora], [spec], seed))
    init = {p: {"a": v["a"][0], "b": v["b"][0]} for p, v in init.items()}
    # start from our initial A (B is zero in both)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                layer = int(name.split("layers.")[1].split(".")[0])
                proj = name.rsplit(".", 1)[1]
                module.lora_A["default"].weight.copy_(torch.tensor(init[proj]["a"][layer].T))
                module.lora_B["default"].weight.zero_()
    examples = tokenize(TOK, texts, spec, EOS)
    plan = make_plan([examples], [spec], seed, PAD, EOS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=spec.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, spec.warmup, plan.steps[0])
    losses, window = [], []
    for s in range(plan.order.shape[1]):
        if not plan.active[0, s]:
            continue
        window.append([i for i in plan.order[0, s] if i >= 0])
        if not plan.boundary[0, s]:
            continue
        total = sum(float(plan.weights[0, i, 1:].sum()) for idx in window for i in idx)
        loss_sum = 0.0
        for idx in window:
            ids = torch.tensor(plan.tokens[0, idx], dtype=torch.long)
            mask = torch.tensor(plan.attention[0, idx], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (nll * torch.tensor(plan.weights[0, idx, 1:])).sum()
            (loss / total).backward()
            loss_sum += float(loss.detach())
        losses.append(loss_sum / total)
        opt.step()
        sched.step()
        opt.zero_grad()
        window = []
    return model, losses


def test_matches_peft_and_torch_adamw(tiny):
    hf_model, lm = tiny
    lora = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    spec = TrainSpec(learning_rate=1e-2, epochs=10, grad_accum=2, warmup=2, weight_decay=0.01, seed=3)
    ours = train(lm, [TEXTS], lora, spec)
    assert ours.failed == [None]
    ref_model, ref_losses = peft_reference(hf_model, lm.params(), TEXTS, lora, spec)
    assert len(ours.losses[0]) == len(ref_losses) == 20
    np.testing.assert_allclose(ours.losses[0], ref_losses, rtol=1e-4)
    assert ref_losses[-1] < 0.9 * ref_losses[0], "the reference run should learn something"
    trained = ours.unpadded(0)
    for name, p in ref_model.named_parameters():
        if "lora_" not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        proj = name.split(".lora_")[0].rsplit(".", 1)[1]
        ours_t = trained[proj]["a"][layer].T if "lora_A" in name else trained[proj]["b"][layer].T
        np.testing.assert_allclose(ours_t, p.detach().numpy(), atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(trained["q_proj"]["b"]).max() > 1e-3, "training should move B away from zero"


def test_initialisation_is_peft_like(tiny):
    _, lm = tiny
    ad = train(lm, [TEXTS[:1]], LoraSpec(rank=8, alpha=16.0), TrainSpec(epochs=1, learning_rate=1e-9))
    a = ad.unpadded(0)["q_proj"]["a"]
    bound = 1 / math.sqrt(64)
    assert a.shape == (2, 64, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.1 * bound


def test_candidates_in_one_program_equal_each_alone(tiny):
    _, lm = tiny
    loras = [LoraSpec(rank=2, alpha=4.0), LoraSpec(rank=8, alpha=4.0, dropout=0.1, targets=("q_proj", "o_proj")),
             LoraSpec(rank=4, alpha=16.0, targets="all")]
    specs = [TrainSpec(learning_rate=1e-2, epochs=2, seed=1), TrainSpec(learning_rate=3e-3, epochs=3, grad_accum=2, seed=2),
             TrainSpec(learning_rate=5e-3, epochs=2, seed=3, warmup=1)]
    data = [TEXTS[:2], TEXTS, TEXTS[1:2]]
    together = train(lm, data, loras, specs, seed=5)
    ids = np.array([TOK(TEXTS[1])["input_ids"]])
    base = lm.logits(ids)
    for k in range(3):
        alone = train(lm, [data[k]], loras[k], specs[k], seed=5)
        assert together.losses[k] == pytest.approx(alone.losses[0], rel=1e-5)
        a, b = together.unpadded(k), alone.unpadded(0)
        assert set(a) == set(b) == set(loras[k].targets)
        la = lm.logits(ids, adapter=together[k])
        lb = lm.logits(ids, adapter=alone[0])
        effect = np.abs(lb - base).max()
        assert effect > 1e-3
        assert np.abs(la - lb).max() <= 0.01 * effect
    # padded ranks and untargeted projections stay exactly zero
    w = together.weights
    assert float(np.abs(np.asarray(w["q_proj"]["a"][0, :, :, 2:])).max()) == 0.0
    assert float(np.abs(np.asarray(w["q_proj"]["b"][0, :, 2:, :])).max()) == 0.0
    assert float(np.abs(np.asarray(w["o_proj"]["b"][0])).max()) == 0.0
    assert float(np.abs(np.asarray(w["o_proj"]["b"][1])).max()) > 0.0


def test_nonfinite_candidate_is_marked_failed_and_others_unaffected(tiny):
    _, lm = tiny
    lora = LoraSpec(rank=4, alpha=8.0)
    good = TrainSpec(learning_rate=1e-2, epochs=2, seed=1)
    bad = TrainSpec(learning_rate=1e38, epochs=2, seed=2)
    both = train(lm, [TEXTS[:2], TEXTS[:2]], lora, [good, bad])
    alone = train(lm, [TEXTS[:2]], lora, good)
    assert both.failed[0] is None
    assert "non-finite" in both.failed[1] and "1e+38" in both.failed[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(both.weights))
    assert all(math.isfinite(x) for x in both.losses[1])
    np.testing.assert_allclose(both.unpadded(0)["v_proj"]["b"], alone.unpadded(0)["v_proj"]["b"], atol=1e-6)


def test_loss_modes_match_transformers_loss(tiny):
    hf_model, lm = tiny
    text = TEXTS[0]
    ids = TOK(text)["input_ids"]
    lora = LoraSpec(rank=2, alpha=2.0)
    # masked: first loss = the base model's mean NLL over the text plus one EOS
    ad = train(lm, [[text]], lora, TrainSpec(epochs=1, learning_rate=1e-9))
    full = torch.tensor([ids + [EOS]])
    with torch.no_grad():
        ref = hf_model(input_ids=full, labels=full).loss.item()
    assert ad.losses[0][0] == pytest.approx(ref, rel=1e-5)
    # seal_padded: padded to max_len with EOS, padding masked as keys but kept in the loss (SEAL's quirk)
    ad = train(lm, [[text]], lora, TrainSpec(epochs=1, learning_rate=1e-9, loss="seal_padded", max_len=40))
    padded = torch.tensor([ids + [EOS] * (40 - len(ids))])
    mask = torch.tensor([[1] * len(ids) + [0] * (40 - len(ids))])
    with torch.no_grad():
        ref = hf_model(input_ids=padded, attention_mask=mask, labels=padded).loss.item()
    assert ad.losses[0][0] == pytest.approx(ref, rel=1e-5)


def test_prompt_tokens_carry_no_loss(tiny):
    hf_model, lm = tiny
    spec = TrainSpec(epochs=1, learning_rate=1e-2)
    lora = LoraSpec(rank=2, alpha=2.0)

    def reference(prompt: str, completion: str, mask_prompt: bool = True) -> float:
        """transformers' loss with the prompt's labels masked (-100): mean NLL of completion + EOS."""
        prompt_ids, ids = TOK(prompt)["input_ids"], TOK(prompt + completion)["input_ids"] + [EOS]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):] if mask_prompt else ids
        with torch.no_grad():
            return hf_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()

    a = train(lm, [[("prompt one", "the answer")]], lora, spec)
    b = train(lm, [[("a different prompt!", "the answer")]], lora, spec)
    # the first loss (before any update) is the completion's NLL given the prompt...
    ref_a, ref_b = reference("prompt one", "the answer"), reference("a different prompt!", "the answer")
    assert a.losses[0][0] == pytest.approx(ref_a, rel=1e-5)
    assert b.losses[0][0] == pytest.approx(ref_b, rel=1e-5)
    assert abs(ref_a - ref_b) > 5e-3  # ...so the prompt conditions it (by far more than rel=1e-5 ≈ 5e-5)
    # and a loss that also counted the prompt's tokens would be clearly different
    assert abs(reference("prompt one", "the answer", mask_prompt=False) - ref_a) > 5e-3
    ex = tokenize(TOK, [("prompt one", "the answer")], spec, EOS)[0]
    plan = make_plan([[ex]], [spec], 0, PAD, EOS)
    assert plan.weights[0, 0, :10].sum() == 0 and plan.weights[0, 0, 10:len(ex.ids)].sum() == len(ex.ids) - 10


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    spec = TrainSpec(learning_rate=0.1, warmup=3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = get_linear_schedule_with_warmup(opt, 3, 10)
    for step in range(10):
        assert lr_at(spec, step, 10) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_spec_validation_and_input_errors(tiny):
    _, lm = tiny
    with pytest.raises(TrainError, match="learning_rate must be positive"):
        TrainSpec(learning_rate=0)
    with pytest.raises(TrainError, match="loss 'x' is unknown"):
        TrainSpec(loss="x")
    with pytest.raises(sj.lm.lora.LoraError, match="unknown LoRA targets"):
        LoraSpec(targets=("qkv",))
    with pytest.raises(sj.lm.lora.LoraError, match="dropout must lie in"):
        LoraSpec(dropout=1.0)
    # a value of another type is named, not a bare TypeError from a comparison
    with pytest.raises(TrainError, match="TrainSpec.learning_rate must be a number, got '1e-3'"):
        TrainSpec(learning_rate="1e-3")
    with pytest.raises(TrainError, match="TrainSpec.shuffle must be true or false, got 'no'"):
        TrainSpec(shuffle="no")
    with pytest.raises(TrainError, match="TrainSpec.epochs must be a positive integer, got True"):
        TrainSpec(epochs=True)
    with pytest.raises(TrainError, match="TrainSpec.seed must be an integer, got '0'"):
        TrainSpec(seed="0")
    with pytest.raises(sj.lm.lora.LoraError, match="LoraSpec.alpha must be a number, got '8'"):
        LoraSpec(alpha="8")
    with pytest.raises(sj.lm.lora.LoraError, match=r"got the string 'q_proj' \(one projection is a list of one: \['q_proj'\]\)"):
        LoraSpec(targets="q_proj")
    assert LoraSpec(targets="all").targets == LoraSpec(targets=("all",)).targets and len(LoraSpec(targets="all").targets) == 7
    with pytest.raises(TrainError, match=r"lora must be a seal_jax.LoraSpec \(or a list of them, one per candidate\), got dict"):
        train(lm, [TEXTS], {"rank": 4}, TrainSpec())
    with pytest.raises(TrainError, match=r"train must be a seal_jax.TrainSpec \(or a list of them, one per candidate\), got dict"):
        train(lm, [TEXTS], LoraSpec(), {"epochs": 1})
    with pytest.raises(TypeError, match="seed must be an integer, got '0'"):
        lm.train_adapters([TEXTS], LoraSpec(), TrainSpec(), seed="0")
    # seeds outside the PRNG's uint32 range are refused up front, not deep in numpy or jax.random.fold_in
    for bad in (-1, 2**32):
        with pytest.raises(TrainError, match=rf"TrainSpec.seed must be in \[0, 2\*\*32\).*got {bad}"):
            TrainSpec(seed=bad)
        with pytest.raises(TrainError, match=rf"seed must be in \[0, 2\*\*32\).*got {bad}"):
            lm.train_adapters([[[3, 4, 5]]], LoraSpec(), TrainSpec(), seed=bad)
    assert TrainSpec(seed=2**32 - 1).seed == 2**32 - 1
    # rows past the model's context (max_position_embeddings; the row below + its EOS) are refused, as logits
    # and generate refuse them
    context = lm.config.max_position_embeddings
    with pytest.raises(TrainError, match=rf"candidate 1 has a training row of {context + 7} tokens, past this "
                                         rf"model's context of {context}.*TrainSpec.max_len <= {context}"):
        lm.train_adapters([[[3, 4, 5]], [[3 + i % 50 for i in range(context + 6)]]], LoraSpec(), TrainSpec(max_len=4096))
    with pytest.raises(TrainError, match=rf"loss 'seal_padded' pads every row to TrainSpec.max_len = 2048.*context "
                                         rf"of {context}"):
        lm.train_adapters([[[3, 4, 5]]], LoraSpec(), TrainSpec(loss="seal_padded"))
    assert LoraSpec.seal() == LoraSpec(32, 64.0, 0.0, ("q_proj", "v_proj"))
    assert TrainSpec.seal().learning_rate == 1e-3 and TrainSpec.seal().epochs == 10
    with pytest.raises(TrainError, match="of lists of strings"):
        train(lm, TEXTS, LoraSpec(), TrainSpec())
    with pytest.raises(TrainError, match="2 candidates but 3 LoraSpecs"):
        train(lm, [TEXTS, TEXTS], [LoraSpec()] * 3, TrainSpec())
    with pytest.raises(TrainError, match=r"candidates \[1\] have no usable"):
        train(lm, [TEXTS, [""]], LoraSpec(), TrainSpec(append_eos=False))
    with pytest.raises(TrainError, match="share TrainSpec.batch_size"):
        train(lm, [TEXTS, TEXTS], LoraSpec(), [TrainSpec(), TrainSpec(batch_size=2)])


def test_lora_with_zero_b_reproduces_base_logits(tiny):
    _, lm = tiny
    ad = train(lm, [TEXTS[:1]], LoraSpec(rank=4, alpha=8.0, targets="all"), TrainSpec(epochs=1, learning_rate=1e-9))
    zeroed = sj.Adapters({p: {"a": ab["a"], "b": ab["b"] * 0} for p, ab in ad.weights.items()}, ad.specs)
    ids = np.arange(3, 20)[None]
    np.testing.assert_array_equal(lm.logits(ids, adapter=zeroed[0]), lm.logits(ids))
    np.testing.assert_array_equal(lm.logits(ids, adapter=zeroed)[0], lm.logits(ids))


def test_masked_steps_leave_parameters_and_moments_bit_identical(tiny):
    from seal_jax.lm.training import CandidateData, Step, train_candidate

    _, lm = tiny
    spec = TrainSpec(learning_rate=1e-2, epochs=2, seed=4)
    ex = tokenize(TOK, TEXTS[:2], spec, EOS)
    plan = make_plan([ex], [spec], 0, PAD, EOS)
    w0 = jax.tree.map(lambda x: x[0], initial_adapters(lm.params(), [LoraSpec(rank=4, alpha=8.0)], [spec], 0))

    def run(order, active, boundary, lr):
        data = CandidateData(scale=2.0, dropout=0.0, weight_decay=0.0, key=None, tokens=plan.tokens[0],
                             attention=plan.attention[0], positions=plan.positions[0], loss_weights=plan.weights[0])
        steps = Step(order, active, boundary, lr, np.arange(len(active)))
        return jax.jit(train_candidate, static_argnums=0)(lm.graphdef, lm.state, w0, data, steps)

    real = plan.active[0]
    # interleave masked steps (pointing at real data, with update flags set) between the real ones
    n = int(real.sum())
    order = np.repeat(plan.order[0][:n], 2, axis=0)
    active = np.tile([True, False], n)
    boundary = np.repeat(plan.boundary[0][:n], 2)
    lr = np.repeat(plan.lr[0][:n], 2)
    w_a, _, _, opt_a = run(plan.order[0][:n], real[:n], plan.boundary[0][:n], plan.lr[0][:n])
    w_b, _, _, opt_b = run(order, active, boundary, lr)
    for x, y in zip(jax.tree.leaves((w_a, opt_a)), jax.tree.leaves((w_b, opt_b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_training_equals_unsharded(tiny, tmp_path):
    hf_model, lm = tiny
    hf_model.save_pretrained(tmp_path)
    sharded = sj.load(tmp_path, mesh="data=2,fsdp=2,tensor=2", progress=False)
    loras = [LoraSpec(rank=4, alpha=8.0), LoraSpec(rank=2, alpha=2.0, targets="all")]
    specs = [TrainSpec(learning_rate=1e-2, epochs=2, seed=1), TrainSpec(learning_rate=5e-3, epochs=2, seed=2)]
    a = train(lm, [TEXTS[:2], TEXTS[2:]], loras, specs)
    b = train_adapters(sharded.graphdef, sharded.state, sharded.params(), TOK, [TEXTS[:2], TEXTS[2:]], loras, specs,
                       eos_id=EOS, pad_id=PAD, mesh=sharded.mesh)
    for k in range(2):
        assert a.losses[k] == pytest.approx(b.losses[k], rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_dense_lanes_equal_packed_lanes(tiny):
    _, lm = tiny
    loras = [LoraSpec(rank=2, alpha=4.0), LoraSpec(rank=4, alpha=4.0, dropout=0.1)]
    specs = [TrainSpec(learning_rate=1e-2, epochs=1, seed=1), TrainSpec(learning_rate=3e-3, epochs=3, seed=2)]
    data = [TEXTS[:2], TEXTS]
    packed = train_adapters(lm.graphdef, lm.state, lm.params(), TOK, data, loras, specs, eos_id=EOS, pad_id=PAD, lanes=1)
    dense = train_adapters(lm.graphdef, lm.state, lm.params(), TOK, data, loras, specs, eos_id=EOS, pad_id=PAD, lanes=2)
    for a, b in zip(packed.losses, dense.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for x, y in zip(jax.tree.leaves(packed.weights), jax.tree.leaves(dense.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_training_memory_from_the_compiled_program(tiny):
    """XLA's memory analysis of the training program: the base weights are among the arguments, and
    four candidates need more work space than one (nothing is trained)."""
    _, lm = tiny
    spec = TrainSpec(learning_rate=1e-3, epochs=1)

    def memory(k):
        return training_memory(lm.graphdef, lm.state, lm.params(), TOK, [TEXTS] * k, LoraSpec(rank=4, alpha=8.0),
                               spec, eos_id=EOS, pad_id=PAD)

    one, four = memory(1), memory(4)
    weights = sum(x.nbytes for x in lm.params().values())
    assert one["arguments"] >= weights and four["arguments"] >= weights
    assert four["temporaries"] > one["temporaries"] > 0
    assert one["total"] >= one["arguments"]


def test_token_id_items_train_exactly_like_their_text(tiny):
    _, lm = tiny
    lora, spec = LoraSpec(rank=4, alpha=8.0), TrainSpec(learning_rate=1e-2, epochs=2, max_len=24)
    as_text = train(lm, [TEXTS[:2], TEXTS[2:]], lora, spec)
    as_ids = train(lm, [[TOK(t)["input_ids"] for t in TEXTS[:2]], [np.array(TOK(t)["input_ids"]) for t in TEXTS[2:]]],
                   lora, spec)
    assert as_ids.losses == as_text.losses
    for a, b in zip(jax.tree.leaves(as_ids.weights), jax.tree.leaves(as_text.weights), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_token_id_items_need_no_tokenizer_but_valid_ids(tiny):
    _, lm = tiny
    args = dict(eos_id=EOS, pad_id=PAD)
    ids = [5, 6, 7, 8]
    adapters = train_adapters(lm.graphdef, lm.state, lm.params(), None, [[ids]], LoraSpec(rank=2, alpha=4.0),
                              TrainSpec(epochs=1), **args)
    assert len(adapters.losses[0]) == 1 and np.isfinite(adapters.losses[0][0])
    with pytest.raises(TrainError, match="no tokenizer.*token-id lists"):
        train_adapters(lm.graphdef, lm.state, lm.params(), None, [["some text"]], LoraSpec(rank=2, alpha=4.0),
                       TrainSpec(epochs=1), **args)
    vocab = lm.config.vocab_size
    with pytest.raises(TrainError, match=rf"outside \[0, {vocab}\) \(e.g. {vocab}\)"):
        train(lm, [[[5, vocab]]], LoraSpec(rank=2, alpha=4.0), TrainSpec(epochs=1))
    with pytest.raises(TrainError, match="list of token ids"):
        train(lm, [[[1.5, 2.0]]], LoraSpec(rank=2, alpha=4.0), TrainSpec(epochs=1))


def test_one_adapter_trains_data_parallel_over_the_mesh(tiny, tmp_path):
    """One candidate on a data=8 mesh: its micro-batch rows split over the 8 devices (each device's share of
    the activations is a row; the adapter gradients are summed across them), and the adapter equals the
    one trained without a mesh. Three candidates on data=2 with batch 1: padded to 4 lanes over the axis."""
    from seal_jax.lm.training import lower_train

    hf_model, lm = tiny
    hf_model.save_pretrained(tmp_path)
    dp = sj.load(tmp_path, mesh="data=8,fsdp=1,tensor=1", progress=False)
    texts = [f"{t} ({i})" for i in range(4) for t in TEXTS]  # 16 sequences, 2 updates per epoch
    lora, spec = LoraSpec(rank=4, alpha=8.0), TrainSpec(learning_rate=1e-2, epochs=2, batch_size=8, seed=3)
    a = train(lm, [texts], lora, spec)
    b = train_adapters(dp.graphdef, dp.state, dp.params(), TOK, [texts], lora, spec, eos_id=EOS, pad_id=PAD,
                       mesh=dp.mesh)
    assert len(a.losses[0]) == 4
    assert a.losses[0] == pytest.approx(b.losses[0], rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)

    how, rows = data_layout(dp.mesh, 1, 8)
    assert how == "rows" and rows.spec[0] == "data"
    hlo = lower_train(dp.graphdef, dp.state, dp.params(), candidates=1, sequences=16, seq_len=32, lora=lora,
                      train=spec, mesh=dp.mesh).compile().as_text()
    hidden = lm.config.hidden_size
    # the per-device hidden states of one lane's micro-batch hold 1 row of 8 (f32[1,1,32,H] under the lane vmap)
    assert f"f32[1,1,32,{hidden}]" in hlo and f"f32[1,8,32,{hidden}]" not in hlo
    assert "all-reduce" in hlo
    assert data_layout(dp.mesh, 8, 8)[0] == "lanes" and data_layout(dp.mesh, 3, 1)[0] == "pad"

    pad = sj.load(tmp_path, mesh="data=2,fsdp=4,tensor=1", progress=False)
    spec1 = TrainSpec(learning_rate=1e-2, epochs=1, seed=4)
    three = [TEXTS[:2], TEXTS[1:3], TEXTS[2:]]
    c = train(lm, three, lora, spec1)
    call_args = dict(eos_id=EOS, pad_id=PAD, mesh=pad.mesh)
    d = train_adapters(pad.graphdef, pad.state, pad.params(), TOK, three, lora, spec1, **call_args)
    for x, y in zip(jax.tree.leaves(c.weights), jax.tree.leaves(d.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    from seal_jax.lm.training import prepare_call

    call = prepare_call(pad.graphdef, pad.state, pad.params(), TOK, three, lora, spec1, seed=0, mesh=pad.mesh,
                        programs=None, lanes=None, eos_id=EOS, pad_id=PAD)
    assert call.lanes.cand.shape[1] == 4 and call.args[-1].step.number.sharding.spec[1] == "data"


def test_lanes_split_over_data_keep_their_candidates_state_on_their_device(tiny, tmp_path):
    """With the lanes split over ``data``, each candidate's adapter and optimiser state stays on its lane's
    device: the compiled step loop has no collective, only the final gather of the trained adapters (before,
    every step all-gathered the lanes' updated state into a replicated per-candidate table)."""
    from seal_jax.hlo import analyze
    from seal_jax.lm.training import lower_train

    hf_model, lm = tiny
    hf_model.save_pretrained(tmp_path)
    dp = sj.load(tmp_path, mesh="data=8,fsdp=1,tensor=1", progress=False)
    lora, spec = LoraSpec(rank=4, alpha=8.0), TrainSpec(learning_rate=1e-2, epochs=2, seed=3)
    texts = [f"{t} ({i})" for i in range(4) for t in TEXTS]
    low = lower_train(dp.graphdef, dp.state, dp.params(), candidates=8, sequences=len(texts), seq_len=32, lora=lora,
                      train=spec, mesh=dp.mesh)
    stats = analyze(low.compile().as_text())
    steps = 2 * len(texts)  # micro-steps of each lane (one candidate per lane and device)
    collectives = sum(c["count"] for c in stats.collectives.values())
    assert collectives <= 4, stats.collectives  # the old per-candidate table: ~28 all-gathers per step (896)
    assert steps == 32
    cands = [texts[i:i + 4] for i in range(0, 16, 2)]
    a = train(lm, cands, lora, spec)
    b = train_adapters(dp.graphdef, dp.state, dp.params(), TOK, cands, lora, spec, eos_id=EOS, pad_id=PAD, mesh=dp.mesh)
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert la == pytest.approx(lb, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_lanes_holding_several_candidates_split_over_data(tiny, tmp_path):
    """Eight candidates on four lanes (two per lane, the general gather/scatter path) split over data=4: the
    adapters, losses and the candidates' order equal those trained without a mesh."""
    hf_model, lm = tiny
    hf_model.save_pretrained(tmp_path)
    dp = sj.load(tmp_path, mesh="data=4,fsdp=2,tensor=1", progress=False)
    lora = LoraSpec(rank=4, alpha=8.0)
    specs = [TrainSpec(learning_rate=1e-2, epochs=1 + i % 2, seed=i) for i in range(8)]
    cands = [TEXTS[i % 3:i % 3 + 2] for i in range(8)]
    from seal_jax.lm.training import prepare_call

    call = prepare_call(dp.graphdef, dp.state, dp.params(), TOK, cands, lora, specs, seed=0, mesh=dp.mesh,
                        programs=None, lanes=4, eos_id=EOS, pad_id=PAD)
    assert call.lanes.home.shape == (4, 2) and call.args[1]["q_proj"]["a"].sharding.spec[0] == "data"
    a = train_adapters(lm.graphdef, lm.state, lm.params(), TOK, cands, lora, specs, eos_id=EOS, pad_id=PAD)
    b = train_adapters(dp.graphdef, dp.state, dp.params(), TOK, cands, lora, specs, eos_id=EOS, pad_id=PAD,
                       mesh=dp.mesh, lanes=4)
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert la == pytest.approx(lb, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("impl, mesh", [("splash", "data=2,fsdp=2,tensor=2"), ("triton", "data=8,fsdp=1,tensor=1")])
def test_fused_attention_training_on_a_mesh_equals_the_cpus_unsharded(tiny, tmp_path, monkeypatch, impl, mesh):
    """The TPU's and GPU's attention kernels (Pallas splash and Triton, run here in interpret mode) inside
    their shard_map: two candidates whose lanes split `data` (2 devices; the vmap over lanes names `data` to
    the shard_map), and one candidate whose micro-batch rows split `data` (8 devices), train the adapters
    the CPU's attention ("causal_blocks") trains without a mesh, on sequences of more than one 128-token tile."""
    calls = []
    kernel = getattr(attn, f"{impl}_attention")
    monkeypatch.setattr(attn, f"{impl}_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    hf_model, lm = tiny
    hf_model.save_pretrained(tmp_path)
    sharded = sj.load(tmp_path, mesh=mesh, progress=False)
    sharded.model.attention_impl = impl
    sharded.graphdef, sharded.state = nnx.split(sharded.model)
    lanes = mesh.startswith("data=2")
    lora = LoraSpec(rank=4, alpha=8.0)
    spec = TrainSpec(learning_rate=1e-2, epochs=1, seed=4, batch_size=2 if lanes else 8)
    texts = [" ".join(TEXTS[i:] + TEXTS[:i]) * 2 for i in range(4)]  # 177 characters (tokens) each
    cands = [texts, texts[::-1]] if lanes else [texts * 2]
    assert data_layout(sharded.mesh, len(cands), spec.batch_size)[0] == ("lanes" if lanes else "rows")
    a = train(lm, cands, lora, spec)
    b = train_adapters(sharded.graphdef, sharded.state, sharded.params(), TOK, cands, lora, spec, eos_id=EOS,
                       pad_id=PAD, mesh=sharded.mesh)
    assert calls and all(shape[1] >= 128 for shape in calls)  # the kernel ran (traced), not the einsum
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert la == pytest.approx(lb, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("remat", ["minimal", "full", "none"])
def test_unrolled_layers_train_what_the_scan_trains(tiny, tmp_path, monkeypatch, remat):
    """GPUs train with the layers unrolled over per-layer weights (split once per call); the adapters, losses
    and dropout masks are the scanned layers' (two heterogeneous candidates, one with LoRA dropout), under
    each remat policy."""
    hf_model, _ = tiny
    hf_model.save_pretrained(tmp_path)
    splits = []
    real = sj.lm.model.Decoder.unstacked_layers
    monkeypatch.setattr(sj.lm.model.Decoder, "unstacked_layers", lambda self: splits.append(1) or real(self))
    lms = {}
    for form in ("scan", "unrolled"):
        lm = sj.load(tmp_path, progress=False)
        assert lm.model.train_layers == "scan"  # the CPU's choice
        lm.model.train_layers, lm.model.remat = form, remat
        lm.graphdef, lm.state = nnx.split(lm.model)
        lms[form] = lm
    loras = [LoraSpec(rank=4, alpha=8.0), LoraSpec(rank=2, alpha=4.0, dropout=0.2)]
    specs = [TrainSpec(learning_rate=1e-2, epochs=2, seed=1), TrainSpec(learning_rate=5e-3, epochs=1, seed=2)]
    a = train(lms["scan"], [TEXTS[:2], TEXTS[2:]], loras, specs)
    assert not splits
    b = train(lms["unrolled"], [TEXTS[:2], TEXTS[2:]], loras, specs)
    assert splits  # traced with the per-layer weights
    for la, lb in zip(a.losses, b.losses, strict=True):
        assert la == pytest.approx(lb, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_train_layers_follow_the_platform():
    from seal_jax.lm.model import Decoder, train_layers_for

    assert [train_layers_for(p) for p in ("cpu", "tpu", "gpu")] == ["scan", "scan", "unrolled"]
    with pytest.raises(ValueError, match="unknown train_layers 'loop'"):
        Decoder(sj.lm.config.preset("tiny"), rngs=nnx.Rngs(0), train_layers="loop")


def _table_transposes(lowered, vocab: int, width: int) -> int:
    """How many transposes of a ``[vocab, width]`` table the lowered program's StableHLO takes."""
    table = f"tensor<{vocab}x{width}x"
    return sum(1 for line in lowered.as_text().splitlines()
               if "stablehlo.transpose" in line and f"({table}" in line)


def test_a_tied_models_loss_reads_the_embedding_as_it_lies(monkeypatch):
    """The loss of a tied model takes the ``[V, D]`` embedding as stored (``Decoder.head_as_stored``): its
    transpose, taken once per call before the chunk loop, was a copy of the table (BENCHMARKS.md, "Tied
    heads split over the vocabulary"). The same program through the transposed head takes it."""
    from seal_jax.lm.model import Decoder

    config = sj.lm.config.preset("tiny").replace(tie_word_embeddings=True, vocab_size=384)
    lm = sj.LM.abstract(config, dtype="float32")

    def transposes() -> int:
        return _table_transposes(lm.lower_train(2, 2, 32, LoraSpec(rank=4, alpha=8.0)), 384, config.hidden_size)

    assert transposes() == 0
    monkeypatch.setattr(Decoder, "head_as_stored", lambda self: (self.head_kernel(), False))
    jax.clear_caches()  # the training program's trace is cached
    try:
        assert transposes() >= 1  # the check sees the copy where the loss takes the [D, V] form
    finally:
        jax.clear_caches()  # no later test may reuse the patched trace
