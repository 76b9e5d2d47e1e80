"""Template search, archives: the plain and novelty archives, and SFT selection between iterations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_templates import INSTRUCTION, flat, template

from seal_jax.selfedit.archive import Archive, ArchiveEntry, NoveltyArchive, select_top
from seal_jax.selfedit.templates import TemplateError


def entry(name, score, iteration=1, instruction=INSTRUCTION, **hp):
    return ArchiveEntry(template(instruction, **hp), score, None, iteration, "generated", name)


def test_seeded_archive():
    archive = Archive.seeded()
    by_name = {e.name: e for e in archive.entries}
    assert {n: e.score for n, e in by_name.items()} == {"rewrite": 0.494, "long_implications": 0.397,
                                                         "repeat_verbatim": 0.335, "empty": 0.327}
    for e in archive.entries:
        assert e.source == "human" and e.iteration == 0
        # to_dict is nested: the hyperparameters under "hyperparameters" (they were at the top level before)
        assert {k: v for k, v in e.template.to_dict().items() if k != "data_creation_instruction"} == {
            "hyperparameters": {"lora_rank": 32, "lora_alpha": 64.0, "lora_dropout": 0.0, "learning_rate": 1e-3,
                                "num_epochs": 10, "gradient_accumulation_steps": 1}}
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


def test_entries_carry_their_unit_and_an_archive_holds_one():
    dense = ArchiveEntry(template(), -2.5, 0.3, 1, "generated", "it1-t0", unit="gold_loglik")
    assert ArchiveEntry.from_dict(dense.to_dict()) == dense and dense.to_dict()["unit"] == "gold_loglik"
    old_row = {k: v for k, v in entry("x", 0.5).to_dict().items() if k != "unit"}  # written before units
    assert ArchiveEntry.from_dict(old_row).unit == "accuracy"
    with pytest.raises(TemplateError, match="log-likelihood per token"):
        ArchiveEntry(template(), 0.5, None, 1, "generated", "y", unit="gold_loglik")
    with pytest.raises(TemplateError, match="unit must be one of"):
        ArchiveEntry(template(), 0.5, None, 1, "generated", "y", unit="bleu")
    with pytest.raises(TemplateError, match="one archive holds one unit"):
        Archive.seeded().add(dense)
    assert Archive([dense]).ranked() == [dense]


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


def test_archive_rows_are_nested_and_old_flat_rows_still_load(tmp_path):
    archive = Archive.seeded()
    archive.add(ArchiveEntry(template(lora_rank=8), 0.41, 0.12, 2, "generated", "it2-t0"))
    rows = archive.to_rows()
    assert all(set(r["template"]) == {"data_creation_instruction", "hyperparameters"} for r in rows)
    # an archive.jsonl written before the nested form (flat templates) reads back as the same entries
    old = [{**r, "template": flat(r["template"])} for r in rows]
    path = tmp_path / "archive.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert Archive.from_jsonl(path).entries == archive.entries


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
    return {"template_id": template_id, "passage_id": passage_id, "fill_index": fill_index, "score": accuracy,
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
    assert out[5]["prompt"] == "fill t1 p1" and out[5]["completion"] == "text t1 p1 1" and out[5]["score"] == 0.7
    assert out[5]["unit"] == "accuracy"
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
    assert select_top([fill_row("t1", "p1", np.int64(0), np.float32(0.5))])[0]["score"] == 0.5
