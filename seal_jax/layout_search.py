"""The mesh layout search of ``seal-jax compile --search``: every sensible layout of a target's chips for
generation, each with the training programs on every training layout, compiled (:mod:`seal_jax.aot`) and
ranked by roofline time among those that fit.

The generation meshes are :func:`candidate_meshes` (``data × fsdp × tensor`` = the chips, ``tensor`` dividing
the KV heads, ``fsdp`` the model width); the training layouts :func:`training_layouts`. Each generation
program compiles once per mesh and each training layout's programs once per search (a shared cache), so a
search costs meshes + training layouts compiles, not their product.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from seal_jax.aot import Workload, compile_workload, no_overlap_seconds
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import ModelConfig
from seal_jax.lm.types import mesh_lays_out, remat_name
from seal_jax.targets import get_target


def candidate_meshes(chips: int, config: ModelConfig) -> list[str]:
    """Every ``data=…,fsdp=…,tensor=…`` over ``chips`` devices that the model can be split on: ``tensor``
    dividing the KV heads (and so the query heads), ``fsdp`` dividing the width; ``data`` takes the rest
    (the candidates and rows, with the base replicated across it)."""
    out = []
    for tensor in (t for t in range(1, chips + 1) if chips % t == 0 and config.num_kv_heads % t == 0):
        for fsdp in (f for f in range(1, chips // tensor + 1) if (chips // tensor) % f == 0
                     and config.hidden_size % f == 0):
            out.append(f"data={chips // (tensor * fsdp)},fsdp={fsdp},tensor={tensor}")
    return out


def layout_time(report: dict[str, Any]) -> float | None:
    """A report's roofline seconds, each program weighted by how often a passage runs it (a program run
    once per run, iteration or round counts once); None when a program did not compile."""
    if not all("roofline_s" in r for r in report["rows"]):
        return None
    return sum(r["roofline_s"] * (r["per_passage"] or 1) for r in report["rows"])


def training_layouts(workload: Workload, chips: int) -> list[tuple[str | None, str]]:
    """The ways to lay the training programs out that a search tries beside each generation mesh, as
    ``(train_mesh, train_weights)``: the workload's own; on the generation mesh itself; on ``data=<chips>``,
    the candidates' lanes over every device, with the base replicated or (with remat) split FSDP-style; and on
    each other mesh of :func:`candidate_meshes` (``data=2,tensor=4``, ``data=4,fsdp=2``, …, the base split by
    the mesh's own rules), which may train faster than the mesh that generates fastest
    (:func:`search_layouts` leaves out the one that is the generation mesh itself)."""
    own = (workload.train_mesh, workload.train_weights)
    if workload.train_mesh and not mesh_lays_out(shd.parse_mesh_spec(workload.train_mesh), chips):
        own = (None, "replicated")  # a config's train mesh for another device count (data=8 on 4 chips)
    if not any(p.kind == "train" for p in workload.programs):  # nothing trains: one layout is enough
        return [own]
    options = [own, (None, "replicated")]
    if chips > 1:
        options.append((f"data={chips}", "replicated"))
        if remat_name(workload.remat) != "none":  # (without remat FSDP keeps every gathered layer: no saving)
            options.append((f"data={chips}", "fsdp"))
    for spec in candidate_meshes(chips, workload.config):
        sizes = shd.parse_mesh_spec(spec)
        if sizes["fsdp"] > 1 or sizes["tensor"] > 1:  # (data=<chips> is above)
            options.append((",".join(f"{axis}={n}" for axis, n in sizes.items() if axis == "data" or n > 1),
                            "replicated"))
    unique: dict[tuple[Any, ...], tuple[str | None, str]] = {}  # one per layout, however its spec is written
    for mesh, weights in options:
        unique.setdefault((_layout_key(mesh), weights), (mesh, weights))
    return list(unique.values())


def _layout_key(spec: str | None) -> tuple[tuple[str, int], ...] | None:
    """A mesh spec's axis sizes, equal for specs that lay the devices out alike (``"data=2,tensor=4"`` and
    ``"data=2,fsdp=1,tensor=4"``); None for none."""
    return tuple(shd.parse_mesh_spec(spec).items()) if spec else None


def search_layouts(workload: Workload, target_name: str, *, only: Sequence[str] | None = None,
                   meshes: Sequence[str] | None = None, train_layouts: Sequence[tuple[str | None, str]] | None = None,
                   on_row: Callable[[dict[str, Any]], None] | None = None,
                   on_entry: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Compile ``workload`` on each mesh of ``meshes`` (default :func:`candidate_meshes` of the target), with
    the training programs on each of ``train_layouts`` (default :func:`training_layouts`; the generation
    programs compile once per mesh, each training layout's programs once), and rank the pairs: those whose
    every program fits, fastest by :func:`layout_time` first, then the others.

    Returns one entry per mesh and training layout: ``{"mesh", "train_mesh", "train_weights", "fits",
    "seconds", "peak_bytes" (the largest program's), "collective_bytes" (summed over programs),
    "collective_share" (of the roofline time, by the link bandwidth), "report"}``; a layout the compiler
    rejects is an entry with ``"error"`` (and no report). ``on_entry`` is called with the entries ranked so far
    after each layout (the CLI writes its JSON then: a search killed part way keeps what it compiled)."""
    target = get_target(target_name)
    out = []
    cache: dict[tuple[Any, ...], dict[str, Any]] = {}
    compiled = dataclasses.replace(workload, programs=tuple(p for p in workload.programs if not only or p.name in only))
    for spec in meshes or candidate_meshes(target.chips, workload.config):
        for train_mesh, train_weights in train_layouts or training_layouts(compiled, target.chips):
            if train_weights == "replicated" and train_mesh and _layout_key(train_mesh) == _layout_key(spec):
                continue  # training on the mesh itself, tried as such
            entry = {"mesh": spec, "train_mesh": train_mesh, "train_weights": train_weights}
            layout = dataclasses.replace(workload, mesh=spec, train_mesh=train_mesh, train_weights=train_weights)
            try:
                report = compile_workload(layout, target_name, only=only, on_row=on_row, cache=cache)
            except Exception as error:  # one layout the compiler rejects must not end the search
                message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
                out.append({**entry, "fits": False, "seconds": None, "no_overlap_seconds": None, "peak_bytes": 0,
                            "collective_bytes": 0.0,
                            "collective_share": None, "error": message, "report": None})
                if on_entry is not None:
                    on_entry(_ranked(out))
                continue
            rows = report["rows"]
            seconds = layout_time(report)
            comm = sum(r.get("collective_bytes", 0.0) * (r["per_passage"] or 1) for r in rows)
            link = target.hardware.link_bandwidth / 2
            out.append({**entry, "fits": bool(rows) and all(r.get("fits") for r in rows), "seconds": seconds,
                        "no_overlap_seconds": no_overlap_seconds(rows, target),
                        "peak_bytes": max((r.get("peak_bytes") or 0 for r in rows), default=0),
                        "collective_bytes": comm,
                        "collective_share": (comm / link) / seconds if seconds else None, "report": report})
            if on_entry is not None:
                on_entry(_ranked(out))
    return _ranked(out)


def _ranked(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: (not e["fits"], e["seconds"] if e["seconds"] is not None else math.inf))


def _training_label(entry: dict[str, Any]) -> str:
    if not entry.get("train_mesh"):
        return "on the mesh"
    if entry.get("train_weights") == "fsdp":
        return f"`{entry['train_mesh']}`, FSDP"
    split = shd.parse_mesh_spec(entry["train_mesh"])
    return f"`{entry['train_mesh']}`, " + ("replicated" if split["fsdp"] * split["tensor"] == 1 else "split by the mesh")


def format_search(entries: Sequence[dict[str, Any]], target: str, workload: str) -> str:
    """The ranked layouts as a Markdown table, with the best by the roofline and, where another, the best
    if no collective overlapped the work."""
    lines = [f"{workload} on {target}: mesh layouts ranked by roofline time (programs weighted by how often a "
             "passage runs them; \"no overlap\": if no collective overlapped the work)", "",
             "| rank | mesh | training | fits | peak GB | roofline s | no overlap s | collectives GB | "
             "collectives' share |", "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for i, e in enumerate(entries, 1):
        share = "–" if e["collective_share"] is None else f"{100 * e['collective_share']:.0f}%"
        secs = "–" if e["seconds"] is None else f"{e['seconds']:.2f}"
        serial = "–" if e.get("no_overlap_seconds") is None else f"{e['no_overlap_seconds']:.2f}"
        fits = "yes" if e["fits"] else f"**no** ({e['error'][:60]})" if e.get("error") else "**no**"
        lines.append(f"| {i if e['fits'] else '–'} | `{e['mesh']}` | {_training_label(e)} | {fits} | "
                     f"{e['peak_bytes'] / 1e9:.2f} | {secs} | {serial} | {e['collective_bytes'] / 1e9:.2f} | {share} |")
    fitting = [e for e in entries if e["fits"]]
    if not fitting:
        return "\n".join(lines + ["", "No layout fits."])
    best = fitting[0]
    lines += ["", f"Best: `{best['mesh']}`, training {_training_label(best)}."]
    timed = [e for e in fitting if e.get("no_overlap_seconds") is not None]
    safe = min(timed, key=lambda e: e["no_overlap_seconds"]) if timed else best
    if safe is not best and best.get("no_overlap_seconds") is not None:
        lines.append(f"If no collective overlapped the work: `{safe['mesh']}`, training {_training_label(safe)} "
                     f"({safe['no_overlap_seconds']:.2f} s against {best['no_overlap_seconds']:.2f} s).")
    return "\n".join(lines)
