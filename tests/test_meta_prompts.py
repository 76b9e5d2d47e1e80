"""Template search, prompts: the meta-prompt, the fill prompt and proposal sampling."""

from __future__ import annotations

import json

import pytest
from fixtures_templates import GOOD, INSTRUCTION, template

from seal_jax.selfedit import meta_prompts as M
from seal_jax.selfedit import templates as T
from seal_jax.selfedit.archive import Archive, NoveltyArchive
from seal_jax.selfedit.meta_prompts import fill_prompt, meta_prompt
from seal_jax.selfedit.templates import Template, TemplateError, parse_template


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


def test_meta_prompt_asks_for_the_nested_structure():
    lines = meta_prompt(Archive.seeded().shown()).splitlines()
    assert '- "hyperparameters": an object with exactly these six fields:' in lines
    for name in T.HYPERPARAMETERS:  # the six are listed under "hyperparameters"
        assert any(line.startswith(f'  - "{name}": ') for line in lines)
    example = json.loads(lines[lines.index("The shape of the answer (replace every value with your own choice):") + 1])
    assert list(example) == ["data_creation_instruction", "hyperparameters"]
    assert list(example["hyperparameters"]) == list(T.HYPERPARAMETERS)
    filled = Template.from_dict({**example, "data_creation_instruction": INSTRUCTION})
    assert filled.to_dict() == {**example, "data_creation_instruction": INSTRUCTION} and filled.notes == ()
    # the archive's plans are shown in the same form
    plans = [json.loads(lines[i + 1]) for i, line in enumerate(lines) if line.startswith("Plan ")]
    assert len(plans) == 4 and all(list(p) == ["data_creation_instruction", "hyperparameters"] for p in plans)


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


def test_meta_prompt_says_what_a_score_measures():
    assert "fraction of those questions answered correctly" in meta_prompt(None)
    dense = meta_prompt(None, "gold_loglik")
    assert "log-probability per token" in dense and "fraction of those questions" not in dense
    with pytest.raises(ValueError, match="reward must be one of"):
        meta_prompt(None, "bleu")


def test_fill_prompt_contains_passage_instruction_and_format():
    t = template("Write {passage} facts as a numbered list, one per line {0}.")
    prompt = fill_prompt(t, "Quarnholt", "Quarnholt is a town {founded} in 1204.")
    assert "Quarnholt\nQuarnholt is a town {founded} in 1204." in prompt
    assert "Write {passage} facts as a numbered list, one per line {0}." in prompt
    assert '"training_sequences"' in prompt
    assert fill_prompt(GOOD, "T", "C") == fill_prompt(Template.from_dict(GOOD), "T", "C")


def test_proposal_sampling():
    exploit = M.proposal_sampling("exploit", 256, seed=3)
    explore = M.proposal_sampling("explore", 256, seed=4)
    assert (exploit.temperature, exploit.top_p, exploit.min_p, exploit.max_new_tokens, exploit.seed) == (
        0.6, 0.95, 0.05, 256, 3)
    assert (explore.temperature, explore.top_p, explore.min_p) == (1.3, 0.95, 0.1)
    assert M.PROPOSAL_SCHEDULE.count("exploit") == 3 and M.PROPOSAL_SCHEDULE.count("explore") == 2
    with pytest.raises(TemplateError, match="exploit"):
        M.proposal_sampling("greedy", 10)
