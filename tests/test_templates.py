"""Template search, pure core: parsing, ranges, similarity, prompts, archives and SFT selection."""

from __future__ import annotations

import collections
import json
import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seal_jax as sj
from seal_jax.selfedit import templates as T
from seal_jax.selfedit.templates import (
    Archive,
    ArchiveEntry,
    NoveltyArchive,
    Template,
    TemplateError,
    fill_prompt,
    hyperparameter_similarity,
    instruction_embeddings_with_backend,
    instruction_similarity,
    mean_sequence_chars,
    meta_prompt,
    pairwise_hyperparameter_similarity,
    parse_fill,
    parse_template,
    select_top,
    similarity_backend,
)

INSTRUCTION = "Write ten questions about the passage, each followed by its answer."
GOOD = {"data_creation_instruction": INSTRUCTION, "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05,
        "learning_rate": 3e-4, "num_epochs": 5, "gradient_accumulation_steps": 2}


def template(instruction: str = INSTRUCTION, **hp) -> Template:
    return Template.from_dict({**GOOD, "data_creation_instruction": instruction, **hp})


def in_range(t: Template) -> bool:
    return (t.lora_rank in (4, 8, 16, 32, 64) and 1.0 <= t.lora_alpha <= 256.0 and 0.0 <= t.lora_dropout < 1.0
            and 1e-5 <= t.learning_rate <= 5e-3 and isinstance(t.num_epochs, int) and 1 <= t.num_epochs <= 20
            and isinstance(t.gradient_accumulation_steps, int) and 1 <= t.gradient_accumulation_steps <= 8
            and len(t.data_creation_instruction) >= 20 and isinstance(t.data_creation_instruction, str))


def test_exported_from_package():
    assert sj.templates.parse_template is parse_template
    assert sj.templates.hyperparameter_similarity is hyperparameter_similarity


# ----------------------------------------------------------------------------------------------------
# Template: validation, clamping, conversion

def test_valid_dict_round_trips_without_notes():
    t = Template.from_dict(GOOD)
    assert t.to_dict() == GOOD and t.notes == ()
    assert Template.from_dict(json.loads(t.to_json())) == t


@pytest.mark.parametrize("field,value,expected", [
    ("lora_rank", 24, 32), ("lora_rank", 20, 16), ("lora_rank", 3, 4), ("lora_rank", 100, 64),
    ("lora_rank", 0, 4), ("lora_rank", -8, 4), ("lora_rank", "8", 8), ("lora_rank", 16.0, 16),
    ("lora_alpha", 0.5, 1.0), ("lora_alpha", 300, 256.0), ("lora_alpha", -3, 1.0),
    ("lora_dropout", -0.1, 0.0), ("lora_dropout", 1.0, 0.99), ("lora_dropout", "0.2", 0.2),
    ("learning_rate", 1.0, 5e-3), ("learning_rate", 1e-7, 1e-5), ("learning_rate", 0, 1e-5),
    ("learning_rate", "1e-4", 1e-4), ("num_epochs", 0, 1), ("num_epochs", 25, 20), ("num_epochs", 3.5, 4),
    ("num_epochs", "7", 7), ("gradient_accumulation_steps", 0, 1), ("gradient_accumulation_steps", 9, 8),
])
def test_out_of_range_numbers_are_clamped_and_noted(field, value, expected):
    t = Template.from_dict({**GOOD, field: value})
    assert getattr(t, field) == pytest.approx(expected) and in_range(t)
    changed = getattr(t, field) != float(value) if not isinstance(value, str) else False
    assert any(field in note for note in t.notes) == changed


@pytest.mark.parametrize("field,value,reason", [
    ("lora_rank", True, "number"), ("lora_alpha", None, "number"), ("lora_dropout", "high", "number"),
    ("learning_rate", float("nan"), "finite"), ("learning_rate", "nan", "finite"),
    ("num_epochs", float("inf"), "finite"), ("num_epochs", [3], "number"), ("lora_rank", {"r": 8}, "number"),
    ("data_creation_instruction", "Rewrite.", "too short"), ("data_creation_instruction", 42, "string"),
    ("data_creation_instruction", "   ", "too short"), ("data_creation_instruction", "word " * 1000, "4000"),
    ("data_creation_instruction", T.PLACEHOLDER_INSTRUCTION, "placeholder"),
])
def test_bad_values_are_rejected_with_reason(field, value, reason):
    with pytest.raises(TemplateError, match=reason):
        Template.from_dict({**GOOD, field: value})


def test_missing_fields_are_named():
    d = dict(GOOD)
    del d["num_epochs"], d["lora_alpha"]
    with pytest.raises(TemplateError, match="lora_alpha.*num_epochs"):
        Template.from_dict(d)
    with pytest.raises(TemplateError, match="JSON object"):
        Template.from_dict([GOOD])


def test_unknown_fields_ignored_with_a_note():
    t = Template.from_dict({**GOOD, "batch_size": 8})
    assert t == Template.from_dict(GOOD) and any("batch_size" in n for n in t.notes)


def test_constructor_is_strict():
    with pytest.raises(TemplateError, match="lora_rank"):
        Template(INSTRUCTION, 24, 32.0, 0.0, 1e-3, 5, 1)
    with pytest.raises(TemplateError, match="learning_rate"):
        Template(INSTRUCTION, 16, 32.0, 0.0, 1e-2, 5, 1)
    with pytest.raises(TemplateError, match="num_epochs"):
        Template(INSTRUCTION, 16, 32.0, 0.0, 1e-3, True, 1)


def test_specs_carry_the_hyperparameters():
    t = Template.from_dict(GOOD)
    lora = t.lora_spec()
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (16, 32.0, 0.05, ("q_proj", "v_proj"))
    assert t.lora_spec(targets=("q_proj",)).targets == ("q_proj",)
    train = t.train_spec(seed=7, max_len=512)
    assert (train.learning_rate, train.epochs, train.batch_size, train.grad_accum, train.seed, train.max_len) == (
        3e-4, 5, 1, 2, 7, 512)
    assert isinstance(train, sj.TrainSpec) and isinstance(lora, sj.LoraSpec)
    with pytest.raises(TemplateError, match="unknown TrainSpec field"):
        t.train_spec(epochz=3)


# ----------------------------------------------------------------------------------------------------
# parse_template

def test_parse_plain_fenced_thinking_and_prose():
    text = json.dumps(GOOD)
    expected = Template.from_dict(GOOD)
    assert parse_template(text) == expected
    assert parse_template(f"Here is my plan:\n```json\n{json.dumps(GOOD, indent=2)}\n```\nGood luck!") == expected
    draft = json.dumps({**GOOD, "lora_rank": 64})
    assert parse_template(f"<think>First idea: {draft}. Better lower rank.</think>\n{text}") == expected


def test_parse_strings_trailing_commas_and_nesting():
    text = ('{"data_creation_instruction": "' + INSTRUCTION + '", "lora_rank": "16", "lora_alpha": "32", '
            '"lora_dropout": "0.05", "learning_rate": "3e-4", "num_epochs": "5", '
            '"gradient_accumulation_steps": "2",}')
    assert parse_template(text) == Template.from_dict(GOOD)
    assert parse_template(json.dumps({"template": GOOD})) == Template.from_dict(GOOD)
    assert parse_template(json.dumps([GOOD, {**GOOD, "lora_rank": 4}])).lora_rank == 16


def test_first_valid_object_wins_and_reason_of_first_template_like_object():
    bad = {**GOOD, "data_creation_instruction": "tiny"}
    other = {**GOOD, "num_epochs": 9}
    assert parse_template(json.dumps(bad) + " then " + json.dumps(other)).num_epochs == 9
    with pytest.raises(TemplateError, match="too short"):
        parse_template('{"note": 1} ' + json.dumps(bad))
    with pytest.raises(TemplateError, match="none has the template fields"):
        parse_template('{"note": 1} {"x": [2]}')


@pytest.mark.parametrize("text,reason", [
    ("", "no JSON object"), ("I cannot do that.", "no JSON object"), ("<think>still thinking", "unfinished"),
    ("{" * 200_000, "no JSON object"), ('{"a":' + "[" * 200_000, "no JSON object"),
    ("x" * 1_000_001, "characters"), (None, "str"), (b'{"a": 1}', "str"),
    (json.dumps(GOOD)[:60], "cut off"),
])
def test_unusable_output_raises_template_error(text, reason):
    with pytest.raises(TemplateError, match=reason):
        parse_template(text)


def test_lone_surrogates_and_control_characters_are_cleaned():
    text = json.dumps(GOOD).replace("Write ten", "Write\\u0000 ten \\ud800")
    t = parse_template(text)
    assert "\x00" not in t.data_creation_instruction and "\ufffd" in t.data_creation_instruction
    t.data_creation_instruction.encode("utf-8")


WORDS = st.sampled_from(["passage", "facts", "write", "every", "name", "date", "question", "answer", "list"])
INSTRUCTIONS = st.lists(WORDS, min_size=5, max_size=25).map(" ".join)
TEMPLATES = st.builds(
    Template, INSTRUCTIONS, st.sampled_from([4, 8, 16, 32, 64]), st.floats(1.0, 256.0), st.floats(0.0, 0.99),
    st.floats(1e-5, 5e-3), st.integers(1, 20), st.integers(1, 8))
PROSE = st.text(max_size=120).filter(lambda s: "think>" not in s and s.count("{") < 8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["1e-4", "16", " 3 ", "nan", "-inf", "1e999", "0x10", INSTRUCTION]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)

# Template-like JSON, one field at a time. Each value is drawn with its kind: "valid" (in range, kept as
# is), "clamped" (a finite number out of range: parsed, changed and noted), "bad" (rejected: wrong type,
# NaN/inf, not a number, unusable instruction) or "junk" (any JSON value: either outcome). Most draws are
# valid so that about half the templates parse; a tenth also lose one or two fields.
FINITE = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**30, 10**30)
VALID_VALUES = {
    "data_creation_instruction": INSTRUCTIONS,
    "lora_rank": st.sampled_from(T.RANK_CHOICES) | st.sampled_from(T.RANK_CHOICES).map(str),
    "lora_alpha": st.floats(1.0, 256.0) | st.integers(1, 256),
    "lora_dropout": st.floats(0.0, 0.99),
    "learning_rate": st.floats(1e-5, 5e-3) | st.floats(1e-5, 5e-3).map(repr),
    "num_epochs": st.integers(1, 20) | st.integers(1, 20).map(float),
    "gradient_accumulation_steps": st.integers(1, 8) | st.integers(1, 8).map(lambda n: f" {n} "),
}
CLAMPED_VALUES = {
    "lora_rank": FINITE.filter(lambda v: v not in T.RANK_CHOICES),
    "lora_alpha": FINITE.filter(lambda v: not 1.0 <= v <= 256.0),
    "lora_dropout": FINITE.filter(lambda v: not 0.0 <= v <= 0.99),
    "learning_rate": FINITE.filter(lambda v: not 1e-5 <= v <= 5e-3),
    "num_epochs": FINITE.filter(lambda v: not (v == int(v) and 1 <= v <= 20)),
    "gradient_accumulation_steps": FINITE.filter(lambda v: not (v == int(v) and 1 <= v <= 8)),
}
BAD_NUMBERS = (st.none() | st.booleans() | st.lists(st.integers(), max_size=2)
               | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
               | st.sampled_from([math.nan, math.inf, -math.inf, "nan", "-inf", "1e999", "0x10", "", "  ", "ten",
                                  "1" * 65, 10**400]))
BAD_INSTRUCTIONS = (st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2)
                    | st.sampled_from(["", "too short", "one two three", T.PLACEHOLDER_INSTRUCTION, "word " * 900]))


def _tagged(name: str):
    valid, bad = VALID_VALUES[name], BAD_INSTRUCTIONS if name == "data_creation_instruction" else BAD_NUMBERS
    clamped = CLAMPED_VALUES.get(name, valid)

    def kind(i: int):
        if i < 32 or (i < 36 and name not in CLAMPED_VALUES):
            return valid.map(lambda v: ("valid", v))
        if i < 36:
            return clamped.map(lambda v: ("clamped", v))
        if i < 38:
            return bad.map(lambda v: ("bad", v))
        return JSON_VALUES.map(lambda v: ("junk", v))

    return st.integers(0, 39).flatmap(kind)


TEMPLATE_LIKE = st.tuples(
    st.fixed_dictionaries({name: _tagged(name) for name in T.FIELDS}),
    st.integers(0, 9).flatmap(lambda i: st.just(()) if i < 9 else st.lists(
        st.sampled_from(T.FIELDS), min_size=1, max_size=2, unique=True)))
TEMPLATE_LIKE_OUTCOMES: collections.Counter[str] = collections.Counter()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_text_only_template_error(text):
    try:
        t = parse_template(text)
    except TemplateError:
        return
    assert in_range(t)


@settings(max_examples=300, deadline=None)
@given(TEMPLATE_LIKE, PROSE)
def _template_like_json_property(draw, prose):
    """Template-like JSON after prose: parsed in range with exactly the expected notes, or refused with a
    TemplateError naming the first field at fault. Counts its outcomes in TEMPLATE_LIKE_OUTCOMES."""
    tagged, dropped = draw
    kinds = {name: kind for name, (kind, _) in tagged.items() if name not in dropped}
    d = {name: value for name, (_, value) in tagged.items() if name not in dropped}
    missing = [name for name in T.FIELDS if name in dropped]
    bad = [name for name in T.FIELDS if kinds.get(name) == "bad"]
    try:
        t = parse_template(prose + json.dumps(d))
    except TemplateError as error:
        message = str(error)
        if missing:
            assert message.startswith(f"template is missing field(s) {missing}"), message
        else:
            # fields are checked in FIELDS order: the first bad one, or a junk value before it, is named
            last = T.FIELDS.index(bad[0]) if bad else len(T.FIELDS) - 1
            at_fault = [n for n in T.FIELDS[:last + 1] if kinds[n] in ("bad", "junk")]
            assert at_fault and any(message.startswith(n + " ") for n in at_fault), (message, kinds)
        TEMPLATE_LIKE_OUTCOMES["rejected"] += 1
        return
    assert not missing and not bad, f"parsed although {missing or bad} should have been refused"
    assert in_range(t)
    for name, kind in kinds.items():
        noted = any(note.startswith(name + " ") for note in t.notes)
        if kind == "valid":
            value = d[name]
            assert getattr(t, name) == (value if name == "data_creation_instruction" else float(value))
            assert not noted, (name, value, t.notes)
        elif kind == "clamped":
            assert noted and getattr(t, name) != d[name], (name, d[name], t.notes)
    TEMPLATE_LIKE_OUTCOMES["parsed"] += 1
    if "clamped" in kinds.values():
        TEMPLATE_LIKE_OUTCOMES["parsed with clamping"] += 1


def test_fuzz_template_like_json_only_template_error_and_in_range():
    TEMPLATE_LIKE_OUTCOMES.clear()
    _template_like_json_property()
    # both paths must be exercised for real, not just the refusal (a strategy of junk parses nothing)
    total = TEMPLATE_LIKE_OUTCOMES["parsed"] + TEMPLATE_LIKE_OUTCOMES["rejected"]
    assert total >= 250, TEMPLATE_LIKE_OUTCOMES
    assert TEMPLATE_LIKE_OUTCOMES["parsed"] >= 0.25 * total, TEMPLATE_LIKE_OUTCOMES
    assert TEMPLATE_LIKE_OUTCOMES["rejected"] >= 0.2 * total, TEMPLATE_LIKE_OUTCOMES
    assert TEMPLATE_LIKE_OUTCOMES["parsed with clamping"] >= 0.1 * total, TEMPLATE_LIKE_OUTCOMES


NUMBERS = st.one_of(st.floats(), st.integers(-10**30, 10**30), st.floats().map(repr), st.integers().map(str))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({name: NUMBERS for name in T.HYPERPARAMETERS}), INSTRUCTIONS)
def test_fuzz_any_finite_numbers_are_clamped_into_range(numbers, instruction):
    d = {"data_creation_instruction": instruction, **numbers}
    finite = all(math.isfinite(float(v)) for v in numbers.values())
    if not finite:
        with pytest.raises(TemplateError, match="finite"):
            parse_template(json.dumps(d))
        return
    t = parse_template(json.dumps(d))
    assert in_range(t) and t.data_creation_instruction == instruction
    for name, value in numbers.items():   # a value already allowed is kept as is, and nothing is noted
        if getattr(t, name) == float(value):
            assert not any(note.startswith(name) for note in t.notes)
        else:
            assert any(note.startswith(name) for note in t.notes)


@settings(max_examples=200, deadline=None)
@given(TEMPLATES, PROSE, PROSE, st.sampled_from(["plain", "fenced", "think", "think+fenced"]),
       st.booleans(), st.booleans())
def test_valid_json_inside_prose_fences_and_thinking_parses(t, before, after, wrap, indent, as_strings):
    d = t.to_dict()
    if as_strings:
        d = {k: (v if k == "data_creation_instruction" else repr(v)) for k, v in d.items()}
    body = json.dumps(d, indent=2 if indent else None)
    if "fenced" in wrap:
        body = f"```json\n{body}\n```"
    text = f"{before}\n{body}\n{after}"
    if "think" in wrap:
        text = f"<think>{before}</think>{text}"
    assert parse_template(text) == t


# ----------------------------------------------------------------------------------------------------
# parse_fill

def test_fill_is_cleaned():
    text = 'Sure!\n```json\n{"training_sequences": ["  The town is old. ", "", 7, null, "It has\\na bridge."]}\n```'
    assert parse_fill(text) == ["The town is old.", "It has\na bridge."]
    assert parse_fill('<think>{"training_sequences": ["draft"]}</think>{"training_sequences": ["final"],}') == ["final"]
    assert parse_fill('{"other": 1, "training_sequences": ["a"]} trailing words') == ["a"]


def test_truncated_fill_keeps_complete_strings():
    text = '{"training_sequences": ["First fact.", "Second fact.", "Third fa'
    assert parse_fill(text) == ["First fact.", "Second fact."]
    with pytest.raises(TemplateError):
        parse_fill(text, allow_truncated=False)


@pytest.mark.parametrize("text,reason", [
    ('{"training_sequences": []}', "no non-empty"), ('{"training_sequences": ["  ", 3]}', "no non-empty"),
    ('{"training_sequences": "one text"}', "list"), ('{"sequences": ["a"]}', "no"), ("plain text answer", "no"),
    ("<think>unfinished", "unfinished"), (None, "str"), ('{"training_sequences": [' + "[" * 100_000, "cut off"),
    ('{"training_sequences": ["never closed', "cut off"),
])
def test_unusable_fill_raises(text, reason):
    with pytest.raises(TemplateError, match=reason):
        parse_fill(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_fill_text_only_template_error(text):
    try:
        sequences = parse_fill(text)
    except TemplateError:
        return
    assert sequences and all(isinstance(s, str) and s and s == s.strip() for s in sequences)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, PROSE)
def test_fuzz_fill_json_only_template_error(value, prose):
    try:
        text = prose + json.dumps({"training_sequences": value})
    except (ValueError, TypeError):
        return
    try:
        sequences = parse_fill(text)
    except TemplateError:
        return
    assert sequences and all(isinstance(s, str) and s and s == s.strip() for s in sequences)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40)
                .filter(lambda s: s.strip() and "think>" not in s), min_size=1, max_size=6), PROSE, PROSE,
       st.booleans())
def test_valid_fill_inside_prose_parses(items, before, after, think):
    # "<think>" / "</think>" are the reasoning markers (everything up to the last "</think>" is dropped),
    # so a fill cannot carry them: they are left out of the items as they are out of the prose
    body = json.dumps({"training_sequences": items})
    text = f"{before}\n```json\n{body}\n```\n{after}"
    if think:
        text = "<think>" + before + "</think>" + text
    assert parse_fill(text) == [s.strip() for s in items]


# ----------------------------------------------------------------------------------------------------
# Similarity

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


# ----------------------------------------------------------------------------------------------------
# Prompts and sampling

def test_meta_prompt_without_archive_lists_fields_and_ranges():
    prompt = meta_prompt(None)
    for name in T.FIELDS:
        assert f'"{name}"' in prompt
    for allowed in ("4, 8, 16, 32, 64", "1 to 256", "0 to 0.99", "0.00001 to 0.005", "1 to 20", "1 to 8"):
        assert allowed in prompt
    assert "tried so far" not in prompt and meta_prompt([]) == prompt
    # a model that copies the example verbatim is told so
    with pytest.raises(TemplateError, match="placeholder"):
        parse_template(prompt)


def test_meta_prompt_shows_archive_entries_with_scores():
    shown = Archive.seeded().shown()
    prompt = meta_prompt(shown)
    positions = [prompt.index(e.template.data_creation_instruction) for e in shown]
    assert positions == sorted(positions)
    for e in shown:
        assert f"score {e.score:.3f}" in prompt
    assert "novelty" not in prompt.lower()
    novel = NoveltyArchive.seeded(backend="tfidf").shown()
    prompt = meta_prompt(novel)
    for e in novel:
        assert f"score {e.score:.3f}, novelty {e.novelty:.3f}" in prompt


def test_fill_prompt_contains_passage_instruction_and_format():
    t = template("Write {passage} facts as a numbered list, one per line {0}.")
    prompt = fill_prompt(t, "Quarnholt", "Quarnholt is a town {founded} in 1204.")
    assert "Quarnholt\nQuarnholt is a town {founded} in 1204." in prompt
    assert "Write {passage} facts as a numbered list, one per line {0}." in prompt
    assert '"training_sequences"' in prompt
    assert fill_prompt(GOOD, "T", "C") == fill_prompt(Template.from_dict(GOOD), "T", "C")


def test_proposal_sampling():
    exploit = T.proposal_sampling("exploit", 256, seed=3)
    explore = T.proposal_sampling("explore", 256, seed=4)
    assert (exploit.temperature, exploit.top_p, exploit.min_p, exploit.max_new_tokens, exploit.seed) == (
        0.6, 0.95, 0.05, 256, 3)
    assert (explore.temperature, explore.top_p, explore.min_p) == (1.3, 0.95, 0.1)
    assert T.PROPOSAL_SCHEDULE.count("exploit") == 3 and T.PROPOSAL_SCHEDULE.count("explore") == 2
    with pytest.raises(TemplateError, match="exploit"):
        T.proposal_sampling("greedy", 10)


# ----------------------------------------------------------------------------------------------------
# Archives

def entry(name, score, iteration=1, instruction=INSTRUCTION, **hp):
    return ArchiveEntry(template(instruction, **hp), score, None, iteration, "generated", name)


def test_seeded_archive():
    archive = Archive.seeded()
    by_name = {e.name: e for e in archive.entries}
    assert {n: e.score for n, e in by_name.items()} == {"rewrite": 0.494, "long_implications": 0.397,
                                                         "repeat_verbatim": 0.335, "empty": 0.327}
    for e in archive.entries:
        assert e.source == "human" and e.iteration == 0
        assert {k: v for k, v in e.template.to_dict().items() if k != "data_creation_instruction"} == {
            "lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.0, "learning_rate": 1e-3, "num_epochs": 10,
            "gradient_accumulation_steps": 1}
        assert e.gain == pytest.approx((e.score - 0.327) / (1 - 0.327))
    assert by_name["empty"].gain == 0.0
    assert [e.name for e in archive.shown()] == ["rewrite", "long_implications", "repeat_verbatim", "empty"]


def test_shown_is_best_second_best_second_worst_worst():
    archive = Archive.seeded()
    for name, score in [("g1", 0.60), ("g2", 0.10), ("g3", 0.45), ("g4", 0.30)]:
        archive.add(entry(name, score))
    assert [e.name for e in archive.ranked()] == [
        "g1", "rewrite", "g3", "long_implications", "repeat_verbatim", "empty", "g4", "g2"]
    assert [e.name for e in archive.shown()] == ["g1", "rewrite", "g4", "g2"]


def test_ties_are_broken_by_iteration_then_name():
    archive = Archive([entry("b", 0.5, 2), entry("c", 0.5, 1), entry("a", 0.5, 2), entry("d", 0.1, 0)])
    assert [e.name for e in archive.ranked()] == ["c", "a", "b", "d"]


@pytest.mark.parametrize("n,expected", [(0, []), (1, ["e0"]), (2, ["e0", "e1"]), (3, ["e0", "e1", "e2"]),
                                        (4, ["e0", "e1", "e2", "e3"]), (5, ["e0", "e1", "e3", "e4"])])
def test_small_archives_show_each_entry_once(n, expected):
    archive = Archive([entry(f"e{i}", 0.9 - 0.1 * i) for i in range(n)])
    assert [e.name for e in archive.shown()] == expected


def test_archive_rejects_bad_entries():
    archive = Archive([entry("x", 0.5)])
    with pytest.raises(TemplateError, match="already has"):
        archive.add(entry("x", 0.6))
    with pytest.raises(TemplateError, match="score"):
        entry("y", 1.5)
    with pytest.raises(TemplateError, match="source"):
        ArchiveEntry(template(), 0.5, None, 1, "alien", "z")
    with pytest.raises(TemplateError, match="missing"):
        ArchiveEntry.from_dict({"name": "x"})


def test_archive_jsonl_round_trip(tmp_path):
    archive = Archive.seeded()
    archive.add(ArchiveEntry(template(lora_rank=8), 0.41, 0.12, 2, "generated", "it2-t0", novelty=0.3))
    path = tmp_path / "archive.jsonl"
    archive.to_jsonl(path)
    loaded = Archive.from_jsonl(path)
    assert loaded.entries == archive.entries and len(loaded) == 5
    assert [e.name for e in NoveltyArchive.from_jsonl(path, backend="tfidf").entries] == [
        e.name for e in archive.entries]
    path.write_text("not json\n")
    with pytest.raises(TemplateError, match="not JSON"):
        Archive.from_jsonl(path)


def clustered_archive(cls, **kwargs):
    """Three near-copies (iteration 1) and one distant template (iteration 2, last by name), equal scores."""
    near = [entry(f"a{i}", 0.4, 1, f"Rewrite the passage in your own words, version {i}.") for i in range(3)]
    far = entry("z", 0.4, 2, "List every number and date in the text with what it counts or dates.",
                lora_rank=4, lora_alpha=8, learning_rate=1e-5, num_epochs=20, gradient_accumulation_steps=8)
    return cls(near + [far], **kwargs)


def test_novelty_prefers_the_distant_candidate_among_equal_scores():
    assert Archive.ranked(clustered_archive(Archive))[0].name == "a0"
    archive = clustered_archive(NoveltyArchive, backend="tfidf")
    ranked = archive.ranked()
    assert ranked[0].name == "z" and archive.backend_used == "tfidf"
    novelty = {e.name: e.novelty for e in ranked}
    assert novelty["z"] > max(novelty["a0"], novelty["a1"], novelty["a2"]) > 0
    shown = archive.shown()
    assert [e.name for e in shown][0] == "z" and all(e.novelty is not None for e in shown)
    assert [e.name for e in clustered_archive(NoveltyArchive, backend="tfidf", lam=0.0).ranked()] == [
        e.name for e in clustered_archive(Archive).ranked()]


def test_novelty_is_mean_distance_to_k_nearest():
    # weight 0: distance = 1 - hyperparameter similarity, which is computed by hand above
    entries = [entry("a", 0.5, lora_rank=4), entry("b", 0.5, lora_rank=8), entry("c", 0.5, lora_rank=64)]
    archive = NoveltyArchive(entries, k=1, weight=0.0, backend="tfidf")
    step = 1 / 4 / 6   # one octave of rank is a quarter of the log2 range, averaged over six fields
    assert np.allclose(archive.novelties(), [step, step, 3 * step])
    archive2 = NoveltyArchive(entries, k=2, weight=0.0, backend="tfidf")
    assert np.allclose(archive2.novelties(), [(step + 4 * step) / 2, (step + 3 * step) / 2, (3 * step + 4 * step) / 2])
    assert archive.novelty_of(template(lora_rank=8)) == pytest.approx(0.0)
    assert archive.novelty_of(template(lora_rank=32)) == pytest.approx(step)
    assert NoveltyArchive([entries[0]], backend="tfidf").novelties().tolist() == [0.0]
    assert NoveltyArchive(backend="tfidf").novelty_of(template()) == 0.0
    # weight 1: distance = 1 - instruction cosine; identical instructions are at distance 0
    same = NoveltyArchive(entries, k=1, weight=1.0, backend="tfidf")
    assert np.allclose(same.novelties(), 0.0, atol=1e-6)


def test_novelty_archive_validates_its_knobs():
    for kwargs in ({"k": 0}, {"weight": 1.5}, {"lam": -1.0}, {"backend": "bert"}):
        with pytest.raises(TemplateError):
            NoveltyArchive(**kwargs)
    seeded = NoveltyArchive.seeded(k=2, backend="tfidf")
    assert seeded.k == 2 and len(seeded) == 4


# ----------------------------------------------------------------------------------------------------
# SFT selection

def fill_row(template_id, passage_id, fill_index, accuracy, **extra):
    return {"template_id": template_id, "passage_id": passage_id, "fill_index": fill_index, "accuracy": accuracy,
            "fill_prompt": f"fill {template_id} {passage_id}", "fill_text": f"text {template_id} {passage_id} "
            f"{fill_index}", "meta_prompt": f"meta {template_id}", "template_text": f"json {template_id}", **extra}


def test_select_top_two_templates_per_passage_with_best_fill():
    rows = [
        fill_row("t1", "p1", 0, 0.5), fill_row("t1", "p1", 1, 0.7), fill_row("t1", "p1", 2, 0.7),
        fill_row("t2", "p1", 0, 0.9, error="parse failed"), fill_row("t2", "p1", 1, 0.2),
        fill_row("t3", "p1", 0, 0.6), fill_row("t3", "p1", 1, None),
        fill_row("t4", "p1", 0, 1.0, fill_text="  "),
        fill_row("t2", "p0", 0, 0.3), fill_row("t1", "p0", 0, 0.3), fill_row("t3", "p0", 0, 0.1),
        fill_row("t4", "p0", 0, float("nan")),
    ]
    out = select_top(rows, k=2)
    assert [(r["passage_id"], r["template_id"], r["fill_index"], r["kind"]) for r in out] == [
        ("p0", "t1", 0, "template"), ("p0", "t1", 0, "fill"), ("p0", "t2", 0, "template"), ("p0", "t2", 0, "fill"),
        ("p1", "t1", 1, "template"), ("p1", "t1", 1, "fill"), ("p1", "t3", 0, "template"), ("p1", "t3", 0, "fill"),
    ]
    assert out[4]["prompt"] == "meta t1" and out[4]["completion"] == "json t1"
    assert out[5]["prompt"] == "fill t1 p1" and out[5]["completion"] == "text t1 p1 1" and out[5]["accuracy"] == 0.7
    assert [r["template_id"] for r in select_top(rows, k=1) if r["kind"] == "fill"] == ["t1", "t1"]
    assert select_top(reversed(rows), k=2) == out


def test_select_top_rejects_malformed_rows():
    row = fill_row("t1", "p1", 0, 0.5)
    del row["fill_prompt"]
    with pytest.raises(TemplateError, match="fill_prompt"):
        select_top([row])
    with pytest.raises(TemplateError, match="k >= 1"):
        select_top([], k=0)
    with pytest.raises(TemplateError, match="fill_index"):
        select_top([fill_row("t1", "p1", None, 0.5)])
    assert select_top([fill_row("t1", "p1", 0, None)]) == []
    assert select_top([fill_row("t1", "p1", np.int64(0), np.float32(0.5))])[0]["accuracy"] == 0.5
