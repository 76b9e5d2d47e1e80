"""Resuming a run folder: the settings a resume may change, the comparison of the config a run started with
(its ``run_config.json``) with the one it resumes with, and saving that file.

A run resumes only with the config it started with, up to :data:`RESUME_FREE_KEYS` (settings that do not
change results, such as ``remat``); :func:`check_run_config` says which keys differ, saved value first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from seal_jax.selfedit.multihost import agree, is_writer
from seal_jax.selfedit.results import RUN_CONFIG_REMEDY, read_state, write_json
from seal_jax.selfedit.run_config import IGNORED_KEYS, RunConfig, RunConfigError

# Settings that do not change a run's results: a run may be resumed with them changed (for example with
# ``remat`` turned on after running out of memory). ``table.key`` names a key inside a table.
# ``hardware`` is among them because the settings it gives are compared where they apply, at the top level.
RESUME_FREE_KEYS = frozenset({"remat", "cpt.eval_batch", "passages_per_program", "train_mesh", "train_weights",
                              "attention", "hardware"})


# Keys added to a table after run folders were written, with the value those folders ran with: a saved
# config without the key compares as if it had that value.
TABLE_KEY_DEFAULTS: dict[str, Any] = {"templates.seed_scores": None}


def _free_keys(previous: dict[str, Any], current: dict[str, Any]) -> frozenset[str]:
    """:data:`RESUME_FREE_KEYS` and the keys the two configs' run kind ignores: what older versions accepted
    and ignored (:data:`~seal_jax.selfedit.run_config.IGNORED_KEYS`, the ``seed`` of ``[train]`` and
    ``[selfedit_sampling]``, ``[templates.novelty]`` beside another variant) never changed a result, so a
    folder that saved one resumes with a config that now leaves it out; a template search's
    ``similarity_backend`` changes only its summary unless either config is the novelty variant."""
    table = next((t for t in IGNORED_KEYS if t in previous or t in current), None)
    extra = {"train.seed", "selfedit_sampling.seed", *IGNORED_KEYS.get(table, {})}
    variants = {(config.get("templates") or {}).get("variant") for config in (previous, current)}
    if "templates" in previous or "templates" in current:
        if (current.get("templates") or {}).get("variant") != "novelty":
            extra.add("templates.novelty")
        if "novelty" not in variants:  # the backend then changes no row, only the summary: a run started with a
            extra.add("templates.similarity_backend")  # backend now refused resumes with another
    return RESUME_FREE_KEYS | extra


def _results_part(key: str, value: Any, free: frozenset[str]) -> Any:
    """``value`` of top-level ``key`` with :data:`TABLE_KEY_DEFAULTS` filled in and without the table
    entries that ``free`` (:func:`_free_keys`) names."""
    if isinstance(value, dict):
        defaults = {k.split(".", 1)[1]: v for k, v in TABLE_KEY_DEFAULTS.items() if k.startswith(f"{key}.")}
        return {k: v for k, v in {**defaults, **value}.items() if f"{key}.{k}" not in free}
    return value


def _compared(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Per top-level key except the free ones (:func:`_free_keys`), the two saved configs' values as a resume
    compares them (:func:`_results_part`; a key one of them lacks counts as :class:`RunConfig`'s default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    free = _free_keys(previous, current)
    keys = (set(previous) | set(current)) - free
    return {k: (_results_part(k, previous.get(k, defaults.get(k)), free),
                _results_part(k, current.get(k, defaults.get(k)), free)) for k in keys}


def config_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two saved configs, except :data:`RESUME_FREE_KEYS`. A key
    one of them lacks (a folder written before the key existed) counts as :class:`RunConfig`'s default."""
    return sorted(k for k, (old, new) in _compared(previous, current).items() if old != new)


_UNSET = object()  # a table entry one of two saved configs lacks


def _shown(table: dict[str, Any], key: str) -> str:
    return repr(table[key]) if key in table else "(unset)"


def describe_differences(previous: dict[str, Any], current: dict[str, Any], *, limit: int = 6) -> str:
    """What :func:`config_differences` finds, as ``"templates.iterations 2 -> 3, k 5 -> 3"``: each differing
    entry of a table by its dotted key, with the saved value first (at most ``limit`` entries)."""
    parts = []
    for key, (old, new) in sorted(_compared(previous, current).items()):
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            parts += [f"{key}.{k} {_shown(old, k)} -> {_shown(new, k)}"
                      for k in sorted(set(old) | set(new)) if old.get(k, _UNSET) != new.get(k, _UNSET)]
        else:
            parts.append(f"{key} {old!r} -> {new!r}")
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def check_run_config(out: Path, config_json: dict[str, Any], *, resume: bool) -> None:
    """When resuming, check that ``config_json`` equals the config saved in ``out/run_config.json``
    (up to :data:`RESUME_FREE_KEYS`).

    Raises:
      RunConfigError: naming the keys that differ.
    """
    config_file = out / "run_config.json"
    if resume and config_file.is_file():
        saved = read_state(config_file, RUN_CONFIG_REMEDY)  # (a damaged file: an error naming it)
        assert saved is not None  # (is_file above)
        changed = config_differences(saved, config_json)
        if changed:
            hint = (" (the mesh may come from a [hardware.<target>] table: resume on the hardware the run started "
                    "on, or set its mesh in the config)") if "mesh" in changed else ""
            raise RunConfigError(f"cannot resume {out}: the config differs in {changed} (saved -> now: "
                                 f"{describe_differences(saved, config_json)}){hint}; a run resumes only with the "
                                 "config it started with: run a changed config into another --out")


def save_run_config(out: Path, config_json: dict[str, Any], *, resume: bool) -> None:
    """Write ``out/run_config.json`` (process 0 only); when resuming, first :func:`check_run_config`
    (on process 0, its verdict shared with every process)."""
    agree(lambda: check_run_config(out, config_json, resume=resume))
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run_config.json", config_json, ensure_ascii=True)  # whole, or the old one
