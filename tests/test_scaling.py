"""Scaling sweeps on a tiny random model: rows appended as measured, figures and tables written."""

from __future__ import annotations

import json

import seal_jax as sj
from seal_jax import scaling
from seal_jax.cli import build_parser
from seal_jax.lm.config import preset


def test_sweeps_write_rows_figures_and_tables(tiny_chat_dir, tmp_path):
    lm = sj.load(tiny_chat_dir, progress=False)
    out = tmp_path / "scaling.jsonl"
    sweep = scaling.Sweep(candidates=(1, 2), seq_lens=(16, 48), depths=(1, 3), sequences=2, length=16, repeats=1)
    rows = scaling.sweep_candidates(lm, sweep, out)
    assert [r["k"] for r in rows] == [1, 2]
    # K candidates of the same size train K times the tokens
    assert rows[1]["tokens"] == 2 * rows[0]["tokens"]
    assert all(r["seconds"] > 0 and r["tokens_per_s"] == r["tokens"] / r["seconds"] for r in rows)
    rows += scaling.sweep_seq_len(lm, sweep, out)
    assert [r["seq_len"] for r in rows[2:]] == [16, 48] and rows[3]["tokens"] > rows[2]["tokens"]
    rows += scaling.sweep_depth(lm, sweep, out)
    depth = rows[4:]
    assert [r["layers"] for r in depth] == [1, 3]
    width = preset("tiny").replace(vocab_size=lm.config.vocab_size)
    assert [r["parameters"] for r in depth] == [width.replace(num_layers=n).num_parameters() for n in (1, 3)]
    assert all(r["forward_compile_seconds"] > 0 for r in depth)
    # every row was appended to the JSONL file as it was measured
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows

    pngs = scaling.plot(rows, tmp_path)
    assert sorted(p.name for p in pngs) == ["scaling_candidates.png", "scaling_depth.png", "scaling_seq_len.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    table = scaling.markdown(rows)
    assert "| K | train s |" in table and "| T | train s |" in table and "| L | parameters |" in table
    assert f"| 3 | {depth[1]['parameters']:,} |" in table


def test_bench_scaling_flag_parses():
    args = build_parser().parse_args(["bench", "--scaling", "out/scaling", "--quick", "--only", "depth"])
    assert args.scaling == "out/scaling" and args.only == "depth"
    assert scaling.Sweep.quick().candidates == (1, 2, 4, 8)
