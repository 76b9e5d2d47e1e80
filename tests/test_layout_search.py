"""The mesh layout search (``seal-jax compile --search``): the layouts it tries, how it ranks them, and what
it prints; compiled for 8 H100s (deviceless) with the tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_aot import TINY, tiny_workload  # tests/ is on sys.path: the same tiny workload as the compile tests

from seal_jax import aot, layout_search
from seal_jax.cli import main as cli_main
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import preset
from seal_jax.lm.types import mesh_lays_out


def test_layout_search_ranks_the_meshes_that_fit(tmp_path, capsys):
    """``--search``: every sensible layout of the target, each with the training programs on it and on
    ``data=8`` (replicated and FSDP), compiled and ranked by roofline time among those that fit; each entry is
    the report a plain compile of that layout gives."""
    assert layout_search.candidate_meshes(8, preset("qwen3-8b")) == [
        "data=8,fsdp=1,tensor=1", "data=4,fsdp=2,tensor=1", "data=2,fsdp=4,tensor=1", "data=1,fsdp=8,tensor=1",
        "data=4,fsdp=1,tensor=2", "data=2,fsdp=2,tensor=2", "data=1,fsdp=4,tensor=2", "data=2,fsdp=1,tensor=4",
        "data=1,fsdp=2,tensor=4", "data=1,fsdp=1,tensor=8"]
    assert all("tensor=4" not in m and "tensor=8" not in m for m in layout_search.candidate_meshes(8, TINY))  # 2 KV heads
    workload = dataclasses.replace(tiny_workload(TINY, "qwen3"), remat="minimal")
    meshes = ["data=1,fsdp=8,tensor=1", "data=8,fsdp=1,tensor=1", "data=2,fsdp=4,tensor=1", "data=4,fsdp=1,tensor=2"]
    # beside each mesh the training programs also run on data=8, with the base replicated and FSDP-split, and
    # on each other mesh the model splits on (the tiny model's 2 KV heads allow tensor=2), written short
    assert layout_search.training_layouts(workload, 8) == [
        (None, "replicated"), ("data=8", "replicated"), ("data=8", "fsdp"),
        ("data=4,fsdp=2", "replicated"), ("data=2,fsdp=4", "replicated"), ("data=1,fsdp=8", "replicated"),
        ("data=4,tensor=2", "replicated"), ("data=2,fsdp=2,tensor=2", "replicated"),
        ("data=1,fsdp=4,tensor=2", "replicated")]
    assert ("data=8", "fsdp") not in layout_search.training_layouts(dataclasses.replace(workload, remat="none"), 8)
    own = dataclasses.replace(workload, train_mesh="data=8", train_weights="fsdp")
    assert layout_search.training_layouts(own, 8)[0] == ("data=8", "fsdp")
    assert layout_search.training_layouts(own, 4) == [(None, "replicated"), ("data=4", "replicated"), ("data=4", "fsdp"),
                                            ("data=2,fsdp=2", "replicated"), ("data=1,fsdp=4", "replicated"),
                                            ("data=2,tensor=2", "replicated"), ("data=1,fsdp=2,tensor=2", "replicated")]
    assert all(mesh_lays_out(shd.parse_mesh_spec(m), 8) for m, _ in layout_search.training_layouts(workload, 8) if m)
    compiled = []
    # (four of them here, to keep the test short; the search takes them all by default)
    layouts = [(None, "replicated"), ("data=8", "replicated"), ("data=8", "fsdp"), ("data=4,tensor=2", "replicated")]
    entries = layout_search.search_layouts(workload, "h100-8", only=["train"], meshes=meshes, train_layouts=layouts,
                                 on_row=compiled.append)
    # a mesh trains on itself once: not again as its own train mesh (data=8 replicated, data=4,tensor=2)
    assert len(entries) == 4 * 4 - 2 and all(e["fits"] for e in entries)
    assert not any(e["mesh"] == meshes[3] and e["train_mesh"] == "data=4,tensor=2" for e in entries)
    assert not any(e["mesh"] == meshes[1] and e["train_mesh"] == "data=8" and e["train_weights"] == "replicated"
                   for e in entries)
    assert [e["seconds"] for e in entries] == sorted(e["seconds"] for e in entries)
    # the pessimistic twin adds each program's communication time to its work: more, unless nothing is sent
    for e in entries:
        if e["collective_bytes"] == 0:
            assert e["no_overlap_seconds"] == pytest.approx(e["seconds"], rel=1e-9)
        else:
            assert e["no_overlap_seconds"] > e["seconds"]
    # each training layout compiled once (on data=8 or data=4,tensor=2 whatever the mesh), each placement once
    # per mesh
    assert sum(r["program"] == "train" for r in compiled) == 4 + 3
    assert sum(r["program"] == "train.placement" for r in compiled) == 3 + 3 + 2 + 2
    by = {(e["mesh"], e["train_mesh"], e["train_weights"]): e for e in entries}
    direct = aot.compile_workload(dataclasses.replace(workload, mesh="data=2,fsdp=4,tensor=1"), "h100-8",
                                  only=["train"])
    assert by["data=2,fsdp=4,tensor=1", None, "replicated"]["seconds"] == pytest.approx(layout_search.layout_time(direct), rel=1e-9)
    # the base replicated over data=8 moves far fewer bytes between chips than one split 8 ways
    assert (by["data=8,fsdp=1,tensor=1", None, "replicated"]["collective_bytes"]
            < by["data=1,fsdp=8,tensor=1", None, "replicated"]["collective_bytes"])
    # a training row reused on another mesh is what compiling that layout alone gives (the weights that stay
    # in that mesh's layout counted again)
    alone = aot.compile_workload(dataclasses.replace(workload, mesh="data=2,fsdp=4,tensor=1", train_mesh="data=8"),
                                 "h100-8", only=["train"])
    reused = by["data=2,fsdp=4,tensor=1", "data=8", "replicated"]
    assert reused["seconds"] == pytest.approx(layout_search.layout_time(alone), rel=1e-9)
    for got, want in zip(reused["report"]["rows"], alone["rows"], strict=True):
        assert {k: got.get(k) for k in ("program", "peak_bytes", "resident_bytes", "fits")} == \
            {k: want.get(k) for k in ("program", "peak_bytes", "resident_bytes", "fits")}
    # nothing trains (--only of generation programs): one layout per mesh
    generation = dataclasses.replace(workload, programs=tuple(p for p in workload.programs if p.kind != "train"))
    assert layout_search.training_layouts(generation, 8) == [(None, "replicated")]
    # FSDP training gathers the layers' weights (and nothing else) and holds less than a replica
    fsdp = {r["program"]: r for r in by["data=1,fsdp=8,tensor=1", "data=8", "fsdp"]["report"]["rows"]}
    replica = {r["program"]: r for r in by["data=1,fsdp=8,tensor=1", "data=8", "replicated"]["report"]["rows"]}
    assert set(fsdp["train"]["collectives"]) == {"all-gather"} and replica["train"]["collectives"] == {}
    assert fsdp["train"]["argument_bytes"] < replica["train"]["argument_bytes"]
    out = tmp_path / "search.json"
    # --mesh with --search: that generation mesh, with every training layout but itself
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "-k", "2", "--only", "train",
                     "--sequences", "2", "--seq-len", "32", "--search", "--mesh", "data=2,fsdp=4",
                     "--json", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    ranked = json.loads(out.read_text())
    assert {e["mesh"] for e in ranked} == {"data=2,fsdp=4"}
    assert "| `data=4,fsdp=2`, split by the mesh |" in printed and "| `data=8`, replicated |" in printed
    assert len(ranked) == 9 - 1  # the nine training layouts above (remat minimal, the CLI's default)
    assert not any(e["train_mesh"] == "data=2,fsdp=4" for e in ranked) and any(e["train_mesh"] == "data=4,fsdp=2"
                                                                               for e in ranked)
    # a --mesh that does not lay out the target is named before anything compiles
    assert cli_main(["compile", "--model", "tiny", "--target", "h100-8", "--only", "train", "--search",
                     "--mesh", "data=2,fsdp=2"]) == 2
    assert "--mesh 'data=2,fsdp=2' does not lay out h100-8's 8 devices" in capsys.readouterr().err
    # the JSON was written after each layout (a killed search keeps what it compiled)
    assert "  1 layouts compiled" in captured.err and f"  {len(ranked)} layouts compiled" in captured.err
    assert f"Best: `{ranked[0]['mesh']}`, training " in printed and "| 1 | `" in printed and "FSDP" in printed


def test_the_search_names_the_best_by_each_bound():
    """The printed ranking names the best layout by the roofline and, where another, the best if no collective
    overlapped the work."""
    common = {"fits": True, "peak_bytes": 1e9, "collective_bytes": 1e9, "collective_share": 0.5, "train_weights": "replicated"}
    entries = [{**common, "mesh": "tensor=8", "train_mesh": "data=4,tensor=2", "seconds": 1.0, "no_overlap_seconds": 3.0},
               {**common, "mesh": "tensor=8", "train_mesh": "data=8", "seconds": 1.5, "no_overlap_seconds": 2.0}]
    text = layout_search.format_search(entries, "h100-8", "w")
    assert "Best: `tensor=8`, training `data=4,tensor=2`, split by the mesh." in text
    assert ("If no collective overlapped the work: `tensor=8`, training `data=8`, replicated (2.00 s against 3.00 s)."
            in text)
    assert "If no collective" not in layout_search.format_search(entries[1:], "h100-8", "w")
