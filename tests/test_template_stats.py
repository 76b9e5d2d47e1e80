"""Template stats: templates by iteration read from the accepted file shapes, per-iteration similarity and
hyperparameter ranges, and their Markdown table."""

from __future__ import annotations

import json

import pytest
from fixtures_templates import PAPER, PAPER_2, flat, template

from seal_jax.selfedit.archive import Archive, ArchiveEntry
from seal_jax.selfedit.diversity import hyperparameter_similarity, instruction_similarity
from seal_jax.selfedit.template_stats import (
    read_templates_by_iteration,
    read_templates_file,
    template_stats,
    template_stats_markdown,
    templates_by_iteration,
)
from seal_jax.selfedit.templates import TemplateError

THIRD = {"data_creation_instruction": "List every number in the passage with what it counts or measures.",
         "hyperparameters": {"lora_rank": 64, "lora_alpha": 128, "lora_dropout": 0.0, "learning_rate": 3e-4,
                             "num_epochs": 10, "gradient_accumulation_steps": 1}}
LONE = {"data_creation_instruction": "Explain each sentence of the passage in simpler words, one per text.",
        "lora_rank": 32, "lora_alpha": "64", "lora_dropout": 0.2, "learning_rate": "2e-4", "num_epochs": 4,
        "gradient_accumulation_steps": 8}
BY_ITERATION = {"1": [PAPER, flat(PAPER_2), THIRD], "iteration-2": [LONE]}


def numbers(d):
    return {k: float(v) for k, v in d["hyperparameters"].items()}


def test_the_shapes_give_the_same_groups(tmp_path):
    expected, skipped = templates_by_iteration(BY_ITERATION)
    assert skipped == 0 and list(expected) == [1, 2] and [len(v) for v in expected.values()] == [3, 1]
    assert expected[1][1] == {"data_creation_instruction": PAPER_2["data_creation_instruction"],
                              "hyperparameters": numbers(PAPER_2)}
    rows = [{"iteration": it, "template": t} for it, ts in ((1, BY_ITERATION["1"]), (2, BY_ITERATION["iteration-2"]))
            for t in ts]
    carrying = [{"iteration": row["iteration"], **row["template"]} for row in rows]
    for name, text in [("by-key.json", json.dumps(BY_ITERATION)), ("rows.json", json.dumps(rows)),
                       ("carrying.json", json.dumps(carrying)),
                       ("rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n"),
                       ("carrying.jsonl", "".join(json.dumps(r) + "\n" for r in carrying))]:
        (tmp_path / name).write_text(text)
        assert read_templates_by_iteration(tmp_path / name) == (expected, 0), name
    # proposals / results rows: null templates skipped, a template id counted once per iteration
    results = [{"iteration": 1, "template_id": None, "template": None},
               *({"iteration": 1, "template_id": f"it1-t{i}", "passage_id": p, "template": t}
                 for p in ("a", "b") for i, t in enumerate(BY_ITERATION["1"])),
               {"iteration": 2, "template_id": "it2-t0", "template": LONE}]
    assert templates_by_iteration(results) == (expected, 1)


def test_a_run_archive_reads_with_the_seeds_as_iteration_zero(tmp_path):
    archive = Archive.seeded()
    archive.add(ArchiveEntry(template(lora_rank=8), 0.41, 0.12, 1, "generated", "it1-t0"))
    archive.add(ArchiveEntry(template(num_epochs=2), 0.30, 0.0, 1, "generated", "it1-t1"))
    archive.to_jsonl(tmp_path / "archive.jsonl")
    groups, skipped = read_templates_by_iteration(tmp_path / "archive.jsonl")
    assert skipped == 0 and [len(groups[0]), len(groups[1])] == [4, 2]
    stats = template_stats(groups, backend="tfidf")
    assert stats[0]["hyperparameter_similarity"] == 1.0   # the seeds share SEAL's hyperparameters
    assert stats[1]["ranges"]["lora_rank"] == (8, 16) and stats[1]["ranges"]["num_epochs"] == (2, 5)


@pytest.mark.parametrize("data,reason", [
    ([PAPER], 'row 1 has no "iteration"'), ({"x1": [PAPER]}, "iteration must be a whole number"),
    ({"1": PAPER}, "must hold a list"), ([{"iteration": -1, "template": PAPER}], "whole number"),
    ({"1": [{**PAPER, "hyperparameters": {**PAPER["hyperparameters"], "num_epochs": "many"}}]},
     "iteration '1', template 0: num_epochs must be a number"),
    ([{"iteration": 1, "template": {**PAPER, "lora_rank": 8}}], "lora_rank is 16 under"),
    ([{"iteration": 1, "template": {"hyperparameters": PAPER["hyperparameters"]}}], "missing"),
    ("text", "expected a JSON object or list"), ([], "no template found; give a file of templates"),
    ({"1": []}, "no template found; give a file of templates"),  # as an empty list, not "0 templates"
    ({"1": [{"template": None}]}, r"no template found \(only 1 row\(s\) without a template"),
    ([{"iteration": 1, "template": None}], r"no template found \(only 1 row\(s\) without a template"),
])
def test_malformed_files_say_where(data, reason):
    with pytest.raises(TemplateError, match=reason):
        templates_by_iteration(data)


def test_stats_per_iteration():
    groups, _ = templates_by_iteration(BY_ITERATION)
    stats = template_stats(groups, backend="tfidf")
    one, two = stats
    assert (one["iteration"], one["templates"], two["iteration"], two["templates"]) == (1, 3, 2, 1)
    templates = BY_ITERATION["1"]
    assert one["hyperparameter_similarity"] == pytest.approx(hyperparameter_similarity(templates), abs=1e-12)
    assert one["instruction_similarity"] == pytest.approx(instruction_similarity(templates, backend="tfidf"),
                                                          abs=1e-12)
    assert one["similarity_backend"] == "tfidf"
    assert one["ranges"] == {"lora_rank": (8, 64), "lora_alpha": (16, 128), "lora_dropout": (0.0, 0.1),
                             "learning_rate": (1e-4, 1e-3), "num_epochs": (3, 10),
                             "gradient_accumulation_steps": (1, 4)}
    assert two["hyperparameter_similarity"] is None and two["instruction_similarity"] is None
    assert two["ranges"] == {"lora_rank": (32, 32), "lora_alpha": (64, 64), "lora_dropout": (0.2, 0.2),
                             "learning_rate": (2e-4, 2e-4), "num_epochs": (4, 4),
                             "gradient_accumulation_steps": (8, 8)}
    assert one["clamped"] == two["clamped"] == 0 and one["rejected"] == 0
    table = template_stats_markdown(stats)
    assert (f"| 1 | 3 | {one['hyperparameter_similarity']:.3f} | {one['instruction_similarity']:.3f} (tfidf) | "
            "8–64 | 16–128 | 0–0.1 | 0.0001–0.001 | 3–10 | 1–4 |") in table
    assert "| 2 | 1 | – | – | 32 | 64 | 0.2 | 0.0002 | 4 | 8 |" in table
    assert "clamp" not in table


def test_values_are_read_as_written_and_clamping_is_counted():
    wide = {**PAPER, "hyperparameters": {**PAPER["hyperparameters"], "lora_rank": 128, "learning_rate": 0.01}}
    stats = template_stats({3: [PAPER, wide]}, backend="tfidf")
    assert stats[0]["ranges"]["lora_rank"] == (16, 128) and stats[0]["ranges"]["learning_rate"] == (1e-4, 0.01)
    assert stats[0]["clamped"] == 1
    assert "seal-jax would clamp 1 of these templates" in template_stats_markdown(stats)


def test_files_without_templates_are_errors_alike(tmp_path):
    """An empty file, an empty JSON object's iteration and only rejected proposals all say the file holds no
    template (before, ``{"1": []}`` gave "0 templates in 0 iteration(s)" and an empty table)."""
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("by-key.json", '{"1": []}'),
                       ("rejected.jsonl", json.dumps({"iteration": 1, "template": None}) + "\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(TemplateError, match=f"{name}: no template found"):
            read_templates_by_iteration(tmp_path / name)


def test_a_cut_off_last_line_is_left_out(tmp_path):
    """A search still writing its proposals.jsonl (or killed mid-write) leaves a cut-off last line: it is left
    out, as results.read_rows does; a damaged line before the last one is still an error."""
    rows = [{"iteration": 1, "template": PAPER}, {"iteration": 1, "template": THIRD}, {"iteration": 2, "template": LONE}]
    lines = [json.dumps(r) for r in rows]
    path = tmp_path / "proposals.jsonl"
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # the last write cut short
    groups, skipped, cut_off = read_templates_file(path)
    assert (list(groups), [len(g) for g in groups.values()], skipped, cut_off) == ([1], [2], 0, 3)
    assert read_templates_by_iteration(path) == (groups, 1)  # counted with the rows left out
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40] + "\n\n")  # cut, then blank lines
    assert read_templates_file(path)[2] == 3
    path.write_text(lines[0] + "\n" + lines[1][:40] + "\n" + lines[2] + "\n")  # a damaged middle line
    with pytest.raises(TemplateError, match=r"proposals.jsonl:2 is not JSON: .*not the cut-off last line"):
        read_templates_file(path)
    path.write_text(lines[0][:40])  # one cut line: not JSONL rows, an error as before
    with pytest.raises(TemplateError, match="proposals.jsonl:1 is not JSON"):
        read_templates_file(path)
