"""Template search, pure core: the Template, its ranges and conversions, and parsing templates and fills."""

from __future__ import annotations

import collections
import json
import math

import pytest
from fixtures_templates import GOOD, GOOD_NESTED, INSTRUCTION, PAPER, flat
from hypothesis import given, settings
from hypothesis import strategies as st

import seal_jax as sj
from seal_jax.selfedit import templates as T
from seal_jax.selfedit.diversity import hyperparameter_similarity
from seal_jax.selfedit.templates import (
    Template,
    TemplateError,
    parse_fill,
    parse_template,
)


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
    # to_dict writes the seed paper's nested form (it wrote the flat GOOD before the nested form was adopted)
    assert t.to_dict() == GOOD_NESTED and t.notes == ()
    assert Template.from_dict(json.loads(t.to_json())) == t


def test_the_seed_papers_nested_template_parses_and_round_trips():
    t = parse_template(json.dumps(PAPER, indent=2))
    assert (t.data_creation_instruction, t.lora_rank, t.lora_alpha, t.lora_dropout, t.learning_rate, t.num_epochs,
            t.gradient_accumulation_steps) == (PAPER["data_creation_instruction"], 16, 32.0, 0.05, 1e-4, 3, 2)
    assert t.notes == () and Template.from_dict(PAPER) == t
    d = t.to_dict()
    assert list(d) == ["data_creation_instruction", "hyperparameters"] and d == PAPER
    assert list(d["hyperparameters"]) == list(T.HYPERPARAMETERS)
    assert Template.from_dict(d) == t and Template.from_dict(json.loads(t.to_json())) == t
    assert json.loads(t.to_json()) == d
    assert parse_template(f"Here is my plan:\n```json\n{json.dumps(PAPER)}\n```") == t


def test_flat_and_nested_forms_give_the_same_template():
    assert Template.from_dict(flat(PAPER)) == Template.from_dict(PAPER)
    assert Template.from_dict(GOOD) == Template.from_dict(GOOD_NESTED)
    assert parse_template(json.dumps(GOOD)) == parse_template(json.dumps(GOOD_NESTED))
    # a field given in both places with the same value (strings are numbers) is fine
    both = {**GOOD_NESTED, "lora_rank": "16", "num_epochs": 5.0}
    assert Template.from_dict(both) == Template.from_dict(GOOD) and Template.from_dict(both).notes == ()
    # a mix: some hyperparameters at the top level, the rest nested
    mixed = {"data_creation_instruction": INSTRUCTION, "lora_rank": 16, "lora_alpha": 32,
             "hyperparameters": {k: v for k, v in GOOD_NESTED["hyperparameters"].items()
                                 if k not in ("lora_rank", "lora_alpha")}}
    assert Template.from_dict(mixed) == Template.from_dict(GOOD)


@pytest.mark.parametrize("field,top", [("lora_rank", 8), ("learning_rate", "1e-3"), ("num_epochs", 4),
                                       ("gradient_accumulation_steps", 1)])
def test_conflicting_flat_and_nested_values_are_rejected_naming_the_field(field, top):
    with pytest.raises(TemplateError, match=f"^{field} is .* under \"hyperparameters\" but .* at the top level"):
        Template.from_dict({**GOOD_NESTED, field: top})
    with pytest.raises(TemplateError, match=f"^{field} is "):
        parse_template(json.dumps({**GOOD_NESTED, field: top}))


def test_nested_form_problems_are_named():
    hp = dict(GOOD_NESTED["hyperparameters"])
    t = Template.from_dict({**GOOD_NESTED, "hyperparameters": {**hp, "batch_size": 8, "warmup": 0.1}})
    assert t == Template.from_dict(GOOD) and any('"hyperparameters"' in n and "batch_size" in n for n in t.notes)
    del hp["num_epochs"]
    with pytest.raises(TemplateError, match=r"missing field\(s\) \['num_epochs'\]"):
        Template.from_dict({**GOOD_NESTED, "hyperparameters": hp})
    with pytest.raises(TemplateError, match="hyperparameters.* must be a JSON object"):
        Template.from_dict({**GOOD_NESTED, "hyperparameters": [16, 32]})
    with pytest.raises(TemplateError, match="lora_dropout must be a number"):
        parse_template(json.dumps({**GOOD_NESTED, "hyperparameters": {**hp, "num_epochs": 5, "lora_dropout": "x"}}))
    with pytest.raises(TemplateError, match="missing field"):   # the reason of the outer object, not its parts
        parse_template(json.dumps({"hyperparameters": GOOD_NESTED["hyperparameters"]}))


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
        st.sampled_from(T.FIELDS), min_size=1, max_size=2, unique=True)),
    st.booleans())   # written in the nested form (hyperparameters under "hyperparameters") or the flat one
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
    """Template-like JSON after prose, flat or nested: parsed in range with exactly the expected notes, or
    refused with a TemplateError naming the first field at fault. Counts its outcomes in
    TEMPLATE_LIKE_OUTCOMES."""
    tagged, dropped, nested = draw
    kinds = {name: kind for name, (kind, _) in tagged.items() if name not in dropped}
    d = {name: value for name, (_, value) in tagged.items() if name not in dropped}
    written = d
    if nested:
        written = {k: v for k, v in d.items() if k == "data_creation_instruction"}
        written["hyperparameters"] = {k: v for k, v in d.items() if k != "data_creation_instruction"}
    missing = [name for name in T.FIELDS if name in dropped]
    bad = [name for name in T.FIELDS if kinds.get(name) == "bad"]
    try:
        t = parse_template(prose + json.dumps(written))
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
    if as_strings:  # the hyperparameters, nested in to_dict's form, as strings
        d = {**d, "hyperparameters": {k: repr(v) for k, v in d["hyperparameters"].items()}}
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
