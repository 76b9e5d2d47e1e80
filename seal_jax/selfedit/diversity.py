"""Diversity of template sets: hyperparameter and instruction similarity, instruction embeddings, fill length.

Templates are read by attribute (a Template's hyperparameter fields, an ArchiveEntry's ``template``) or as
dicts in either JSON form (the seed paper's nested ``{"data_creation_instruction": ..., "hyperparameters":
{...}}`` or the flat one, see :mod:`~seal_jax.selfedit.template_errors`): this module does not import :mod:`~seal_jax.selfedit.templates`, which re-exports
:func:`hyperparameter_similarity` and :func:`instruction_similarity` as ``sj.templates.*``.

Hyperparameter similarity of a set of templates (the paper's measure): the mean over pairs and fields of
``max(0, 1 − |Δ| / range)`` on fixed scales — rank log2 [4, 64], alpha log2 [1, 256], dropout linear
[0, 1], learning rate log10 [1e-5, 5e-3], epochs linear [1, 20], grad-accum linear [1, 8]. Sets of fewer
than two templates have no pair and raise :class:`TemplateError` (so an iteration with one usable template
cannot masquerade as "fully homogeneous").

Instruction similarity is the mean pairwise cosine of instruction embeddings (of instruction strings, or of
the ``data_creation_instruction`` of templates given as above). The embeddings come from
``seal_jax.selfedit.embeddings.embed`` (a sentence-embedding model, rows L2-normalised) when that module
imports and does not raise ``EmbeddingsUnavailable``; otherwise from the fallback, character 3-gram TF-IDF
vectors computed in numpy over the given texts (lower-cased, whitespace collapsed, smoothed idf
``ln((1 + N) / (1 + df)) + 1``, rows L2-normalised): identical texts have cosine 1, texts without a
shared 3-gram cosine 0. :func:`instruction_embeddings_with_backend` and :func:`similarity_backend` say
which backend was used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seal_jax.selfedit.template_errors import TemplateError, _flat_template, _number

__all__ = [
    "BACKENDS", "SIMILARITY_SCALES", "hyperparameter_similarity", "instruction_embeddings",
    "instruction_embeddings_with_backend", "instruction_similarity", "instruction_similarity_with_backend",
    "instructions_of", "mean_sequence_chars",
    "pairwise_hyperparameter_similarity", "pairwise_instruction_similarity", "similarity_backend",
]

# (scale, low, high) of each hyperparameter for the similarity measure.
SIMILARITY_SCALES: dict[str, tuple[str, float, float]] = {
    "lora_rank": ("log2", 4.0, 64.0),
    "lora_alpha": ("log2", 1.0, 256.0),
    "lora_dropout": ("linear", 0.0, 1.0),
    "learning_rate": ("log10", 1e-5, 5e-3),
    "num_epochs": ("linear", 1.0, 20.0),
    "gradient_accumulation_steps": ("linear", 1.0, 8.0),
}


def _hyperparameters_of(item: Any) -> dict[str, Any]:
    """The hyperparameters of a dict (nested or flat form), a Template or an ArchiveEntry's template; read
    by attribute, since this module does not import templates (which imports it)."""
    if isinstance(item, Mapping):
        return _flat_template(item)[0]
    template = getattr(item, "template", item)  # an ArchiveEntry holds its Template here
    if all(hasattr(template, name) for name in SIMILARITY_SCALES):
        return {name: getattr(template, name) for name in SIMILARITY_SCALES}
    raise TemplateError(f"expected a Template, ArchiveEntry or dict, got {type(item).__name__}")


def _instruction_of(item: Any) -> str:
    """The instruction of a string (itself), a template dict (either form), a Template or an ArchiveEntry."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        text = item.get("data_creation_instruction")
    else:
        text = getattr(getattr(item, "template", item), "data_creation_instruction", None)
    if not isinstance(text, str):
        raise TemplateError(f"expected an instruction string, or a Template, ArchiveEntry or dict with a "
                            f"data_creation_instruction string, got {type(item).__name__}")
    return text


def instructions_of(items: Sequence[Any]) -> list[str]:
    """The instructions of ``items``: strings as they are; templates (dicts in either form, Template or
    ArchiveEntry objects) by their ``data_creation_instruction``."""
    return [_instruction_of(item) for item in items]


def _scaled(templates: Sequence[Any]) -> np.ndarray:
    """``[N, 6]`` positions of the templates' hyperparameters on the similarity scales (0 … 1 in range)."""
    rows = []
    for item in templates:
        d = _hyperparameters_of(item)
        row = []
        for name, (scale, low, high) in SIMILARITY_SCALES.items():
            if name not in d:
                raise TemplateError(f"template has no {name}; hyperparameter similarity needs "
                                    f"{list(SIMILARITY_SCALES)}")
            value = _number(name, d[name])
            if scale == "linear":
                row.append((value - low) / (high - low))
                continue
            if value <= 0:
                raise TemplateError(f"{name} must be positive for its log scale, got {value!r}")
            log = math.log2 if scale == "log2" else math.log10
            row.append((log(value) - log(low)) / (log(high) - log(low)))
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(SIMILARITY_SCALES))


def pairwise_hyperparameter_similarity(templates: Sequence[Any]) -> np.ndarray:
    """``[N, N]`` similarity of every pair: mean over the six fields of ``max(0, 1 − |Δ|/range)``.

    ``templates``: Template objects, ArchiveEntry objects or template dicts (nested or flat form).
    """
    x = _scaled(list(templates))
    return np.clip(1.0 - np.abs(x[:, None, :] - x[None, :, :]), 0.0, None).mean(axis=-1)


def _mean_off_diagonal(matrix: np.ndarray, what: str) -> float:
    n = matrix.shape[0]
    if n < 2:
        raise TemplateError(f"{what} needs at least two items, got {n}")
    i, j = np.triu_indices(n, k=1)
    return float(matrix[i, j].mean())


def hyperparameter_similarity(templates: Sequence[Any]) -> float:
    """Mean pairwise hyperparameter similarity of a set of templates (1.0 = identical hyperparameters).

    ``templates``: Template objects, ArchiveEntry objects or template dicts, nested (the six hyperparameter
    fields under ``"hyperparameters"``) or flat (numbers may be strings). Raises :class:`TemplateError` for fewer than two templates.
    """
    return _mean_off_diagonal(pairwise_hyperparameter_similarity(templates), "hyperparameter_similarity")


def _tfidf_embeddings(texts: Sequence[str]) -> np.ndarray:
    """``[N, V]`` float32 character 3-gram TF-IDF vectors over ``texts``, rows L2-normalised (zero rows
    for texts without a 3-gram)."""
    grams: list[dict[str, int]] = []
    vocabulary: dict[str, int] = {}
    for text in texts:
        s = " " + " ".join(str(text).lower().split()) + " "
        counts: dict[str, int] = {}
        for k in range(len(s) - 2):
            gram = s[k:k + 3]
            if gram.strip():
                counts[gram] = counts.get(gram, 0) + 1
        for gram in counts:
            vocabulary.setdefault(gram, len(vocabulary))
        grams.append(counts)
    tf = np.zeros((len(texts), max(len(vocabulary), 1)), dtype=np.float64)
    for row, counts in enumerate(grams):
        for gram, count in counts.items():
            tf[row, vocabulary[gram]] = count
    df = (tf > 0).sum(axis=0)
    idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0
    vectors = tf * idf
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _model_embeddings(texts: Sequence[str]) -> np.ndarray | None:
    """``seal_jax.selfedit.embeddings.embed(texts)``, or None when that backend is unavailable."""
    try:
        from seal_jax.selfedit.embeddings import (  # deferred: the encoder imports jax
            EmbeddingsUnavailable,
            embed,
        )
    except ImportError:
        return None
    try:
        vectors = np.asarray(embed(list(texts)), dtype=np.float32).reshape(len(texts), -1)
    except EmbeddingsUnavailable:
        return None
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)   # promised already; cheap to make sure
    return vectors / np.where(norms > 0, norms, 1.0)


BACKENDS = ("auto", "embeddings", "tfidf")


def instruction_embeddings_with_backend(texts: Sequence[str], backend: str = "auto") -> tuple[np.ndarray, str]:
    """``([N, D] float32 rows L2-normalised, backend name)`` for ``texts``.

    ``backend``: ``"auto"`` (the embedding model if available, else TF-IDF), ``"embeddings"`` (raises
    :class:`TemplateError` if unavailable) or ``"tfidf"``. The returned name is ``"embeddings"`` or
    ``"tfidf"``.
    """
    if backend not in BACKENDS:
        raise TemplateError(f"unknown similarity backend {backend!r}; choose from {BACKENDS}")
    texts = [str(t) for t in texts]
    if backend != "tfidf":
        vectors = _model_embeddings(texts)
        if vectors is not None:
            return vectors, "embeddings"
        if backend == "embeddings":
            raise TemplateError("the embeddings backend is unavailable (seal_jax.selfedit.embeddings did not "
                                "import or raised EmbeddingsUnavailable); use backend='tfidf' or 'auto'")
    return _tfidf_embeddings(texts), "tfidf"


def instruction_embeddings(texts: Sequence[str], backend: str = "auto") -> np.ndarray:
    """``[N, D]`` float32 embeddings of ``texts``, rows L2-normalised (see
    :func:`instruction_embeddings_with_backend`)."""
    return instruction_embeddings_with_backend(texts, backend)[0]


def similarity_backend() -> str:
    """The backend ``"auto"`` uses right now: ``"embeddings"`` or ``"tfidf"`` (embeds one probe text)."""
    return "embeddings" if _model_embeddings(["probe"]) is not None else "tfidf"


def _pairwise_cosine(instructions: Sequence[Any], backend: str) -> tuple[np.ndarray, str]:
    vectors, used = instruction_embeddings_with_backend(instructions_of(instructions), backend)
    return np.clip(vectors.astype(np.float64) @ vectors.astype(np.float64).T, -1.0, 1.0), used


def pairwise_instruction_similarity(instructions: Sequence[Any], backend: str = "auto") -> np.ndarray:
    """``[N, N]`` cosine similarity of the instructions' embeddings (``instructions``: strings or templates,
    see :func:`instructions_of`)."""
    return _pairwise_cosine(instructions, backend)[0]


def instruction_similarity_with_backend(instructions: Sequence[Any], backend: str = "auto") -> tuple[float, str]:
    """``(mean pairwise cosine similarity, backend used)`` of instructions (see :func:`instruction_similarity`)."""
    if len(instructions) < 2:
        raise TemplateError(f"instruction_similarity needs at least two items, got {len(instructions)}")
    cosine, used = _pairwise_cosine(instructions, backend)
    return _mean_off_diagonal(cosine, "instruction_similarity"), used


def instruction_similarity(instructions: Sequence[Any], backend: str = "auto") -> float:
    """Mean pairwise cosine similarity of instructions (1.0 = identical). ``instructions``: strings, or
    templates (dicts in either form, Template or ArchiveEntry objects) whose ``data_creation_instruction``
    is compared. Raises :class:`TemplateError` for fewer than two."""
    return instruction_similarity_with_backend(instructions, backend)[0]


def mean_sequence_chars(fills: Sequence[Sequence[str]]) -> float:
    """Mean over fills of the total characters of a fill's training sequences (0.0 for no fills)."""
    if not fills:
        return 0.0
    return float(np.mean([sum(len(s) for s in fill) for fill in fills]))
