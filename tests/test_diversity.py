"""Template search, diversity: hyperparameter and instruction similarity, embedding backends, fill length."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from fixtures_templates import PAPER, PAPER_2, flat, template

from seal_jax.selfedit.diversity import (
    hyperparameter_similarity,
    instruction_embeddings_with_backend,
    instruction_similarity,
    instruction_similarity_with_backend,
    mean_sequence_chars,
    pairwise_hyperparameter_similarity,
    similarity_backend,
)
from seal_jax.selfedit.templates import Template, TemplateError

MINIMA = {"lora_rank": 4, "lora_alpha": 1, "lora_dropout": 0.0, "learning_rate": 1e-5, "num_epochs": 1,
          "gradient_accumulation_steps": 1}
MAXIMA = {"lora_rank": 64, "lora_alpha": 256, "lora_dropout": 1.0, "learning_rate": 5e-3, "num_epochs": 20,
          "gradient_accumulation_steps": 8}


def test_hyperparameter_similarity_identical_and_extremes():
    assert hyperparameter_similarity([template(), template("Another instruction with enough words here.")]) == 1.0
    assert hyperparameter_similarity([MINIMA, MAXIMA]) == 0.0
    beyond = {**MAXIMA, "lora_alpha": 4096, "num_epochs": 100}   # clipped at 0, never negative
    assert hyperparameter_similarity([MINIMA, beyond]) == 0.0


def test_hyperparameter_similarity_hand_worked():
    a = {"lora_rank": 4, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-4, "num_epochs": 1,
         "gradient_accumulation_steps": 1}
    b = {"lora_rank": 16, "lora_alpha": 64, "lora_dropout": 0.5, "learning_rate": 1e-3, "num_epochs": 20,
         "gradient_accumulation_steps": 8}
    # rank log2: |2 - 4| / 4; alpha log2: |4 - 6| / 8; dropout 0.5; lr: one decade of log10(500); epochs and
    # grad-accum span their whole range.
    ab = (0.5 + 0.75 + 0.5 + (1 - 1 / math.log10(500)) + 0 + 0) / 6
    assert hyperparameter_similarity([a, b]) == pytest.approx(ab, abs=1e-12)
    assert ab == pytest.approx(0.39658, abs=1e-5)
    c = {**a, "num_epochs": "10"}   # strings are numbers; only epochs differ from a: 1 - 9/19
    ac = (5 + (1 - 9 / 19)) / 6
    bc = (0.5 + 0.75 + 0.5 + (1 - 1 / math.log10(500)) + (1 - 10 / 19) + 0) / 6
    assert hyperparameter_similarity([a, b, c]) == pytest.approx((ab + ac + bc) / 3, abs=1e-12)
    m = pairwise_hyperparameter_similarity([a, b, c])
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0) and m[0, 1] == pytest.approx(ab)


def test_hyperparameter_similarity_of_the_seed_papers_nested_templates():
    # PAPER: rank 16, alpha 32, dropout 0.05, lr 1e-4, epochs 3, grad-accum 2;
    # PAPER_2: rank 8, alpha 16, dropout 0.1, lr 1e-3, epochs 5, grad-accum 4. Per field 1 - |delta| / range:
    rank = 1 - abs(math.log2(16) - math.log2(8)) / (math.log2(64) - math.log2(4))        # 1 - 1/4
    alpha = 1 - abs(math.log2(32) - math.log2(16)) / (math.log2(256) - math.log2(1))     # 1 - 1/8
    dropout = 1 - abs(0.05 - 0.1) / (1 - 0)                                              # 0.95
    lr = 1 - abs(math.log10(1e-4) - math.log10(1e-3)) / (math.log10(5e-3) - math.log10(1e-5))  # 1 - 1/log10(500)
    epochs = 1 - abs(3 - 5) / (20 - 1)                                                   # 1 - 2/19
    accum = 1 - abs(2 - 4) / (8 - 1)                                                     # 1 - 2/7
    expected = (rank + alpha + dropout + lr + epochs + accum) / 6
    assert expected == pytest.approx((0.75 + 0.875 + 0.95 + (1 - 1 / math.log10(500)) + 17 / 19 + 5 / 7) / 6)
    assert hyperparameter_similarity([PAPER, PAPER_2]) == pytest.approx(expected, abs=1e-12)
    # the same in the flat form, as Template objects, and mixed
    assert hyperparameter_similarity([flat(PAPER), flat(PAPER_2)]) == pytest.approx(expected, abs=1e-12)
    as_templates = [Template.from_dict(PAPER), Template.from_dict(PAPER_2)]
    assert hyperparameter_similarity(as_templates) == pytest.approx(expected, abs=1e-12)
    assert hyperparameter_similarity([PAPER, flat(PAPER_2)]) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(TemplateError, match="^lora_rank is"):   # a field given twice with different values
        hyperparameter_similarity([PAPER, {**PAPER_2, "lora_rank": 64}])


def test_instruction_similarity_reads_templates_in_either_form(no_embedding_model):
    texts = [PAPER["data_creation_instruction"], PAPER_2["data_creation_instruction"]]
    expected = instruction_similarity(texts)
    assert 0.0 < expected < 1.0
    assert instruction_similarity([PAPER, PAPER_2]) == expected
    assert instruction_similarity([flat(PAPER), Template.from_dict(PAPER_2)]) == expected
    assert instruction_similarity_with_backend([PAPER, PAPER_2]) == (expected, "tfidf")
    with pytest.raises(TemplateError, match="data_creation_instruction"):
        instruction_similarity([PAPER, {"hyperparameters": {}}])


def test_hyperparameter_similarity_needs_two_and_valid_values():
    with pytest.raises(TemplateError, match="at least two"):
        hyperparameter_similarity([template()])
    with pytest.raises(TemplateError, match="positive"):
        hyperparameter_similarity([MINIMA, {**MINIMA, "learning_rate": 0}])
    with pytest.raises(TemplateError, match="num_epochs"):
        hyperparameter_similarity([MINIMA, {k: v for k, v in MINIMA.items() if k != "num_epochs"}])


@pytest.fixture
def no_embedding_model(monkeypatch):
    """Make ``seal_jax.selfedit.embeddings`` unimportable, forcing the TF-IDF fallback."""
    monkeypatch.setitem(sys.modules, "seal_jax.selfedit.embeddings", None)


def test_fallback_similarity(no_embedding_model):
    assert similarity_backend() == "tfidf"
    assert instruction_similarity(["Rewrite the passage.", "Rewrite the passage."]) == pytest.approx(1.0)
    assert instruction_similarity(["abc def ghi", "uvw xyz kmn"]) == pytest.approx(0.0, abs=1e-7)
    partial = instruction_similarity(["Rewrite the passage in your own words.", "Rewrite the passage twice."])
    assert 0.2 < partial < 0.95
    # by hand: " abc " and " abd " share " ab" (df 2, idf 1); the other four 3-grams have idf ln(3/2) + 1
    w = math.log(1.5) + 1
    vectors, backend = instruction_embeddings_with_backend(["abc", "ABD"])
    assert backend == "tfidf" and vectors.shape[0] == 2 and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1 / (1 + 2 * w * w), rel=1e-6)
    with pytest.raises(TemplateError, match="unavailable"):
        instruction_embeddings_with_backend(["abc"], backend="embeddings")
    with pytest.raises(TemplateError, match="at least two"):
        instruction_similarity(["only one"])


def fake_embeddings_module(vectors=None):
    module = types.ModuleType("seal_jax.selfedit.embeddings")

    class EmbeddingsUnavailable(RuntimeError):
        pass

    def embed(texts):
        if vectors is None:
            raise EmbeddingsUnavailable("no model")
        return np.asarray([vectors[t] for t in texts], dtype=np.float32)

    module.EmbeddingsUnavailable, module.embed = EmbeddingsUnavailable, embed
    return module


def test_embedding_backend_used_when_available(monkeypatch):
    s = math.sqrt(0.5)
    table = {"a": [1.0, 0.0], "b": [s, s], "probe": [1.0, 0.0]}
    monkeypatch.setitem(sys.modules, "seal_jax.selfedit.embeddings", fake_embeddings_module(table))
    assert similarity_backend() == "embeddings"
    vectors, backend = instruction_embeddings_with_backend(["a", "b"])
    assert backend == "embeddings" and np.allclose(vectors, [[1, 0], [s, s]])
    assert instruction_similarity(["a", "b"]) == pytest.approx(s)
    assert instruction_embeddings_with_backend(["a", "b"], backend="tfidf")[1] == "tfidf"


def test_embedding_backend_raising_unavailable_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "seal_jax.selfedit.embeddings", fake_embeddings_module(None))
    assert similarity_backend() == "tfidf"
    assert instruction_embeddings_with_backend(["abc", "abc"])[1] == "tfidf"


def test_mean_sequence_chars():
    assert mean_sequence_chars([["ab", "cde"], ["f"]]) == 3.0
    assert mean_sequence_chars([["abcd"], []]) == 2.0
    assert mean_sequence_chars([]) == 0.0
