"""`seal-jax bench --smoke` on a tiny model: every entry runs and the JSON has the documented schema."""

from __future__ import annotations

import json

from seal_jax import bench
from seal_jax.cli import build_parser

ROW_KEYS = {"name", "ours", "reference", "unit", "ratio", "fraction_of_limit", "detail"}


NAMES = ["prefill", "decode_b1", "decode_b8", "decode_b32", "lora_train", "candidates_k8", "e2e_demo"]


def _check_rows(data: dict, with_reference: bool) -> None:
    assert {"matmul_flops", "matmul_flops_bf16", "read_bandwidth", "cores"} <= set(data["machine"])
    assert data["code"]["seal_jax"] and data["code"]["source"]  # which tree was measured (seal_jax.provenance)
    assert data["machine"]["matmul_flops"] > 0 and data["machine"]["matmul_flops_bf16"] > 0
    assert [r["name"] for r in data["rows"]] == NAMES
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["ours"] > 0
        if row["name"] == "e2e_demo":  # no reference implementation of the whole loop exists
            assert row["reference"] is None and row["ratio"] is None and row["fraction_of_limit"] is None
            continue
        assert row["fraction_of_limit"] > 0
        if with_reference:
            assert row["reference"] > 0 and row["ratio"] > 0
            assert abs(row["ratio"] - row["ours"] / row["reference"]) < 1e-6 * row["ratio"]
        else:
            assert row["reference"] is None and row["ratio"] is None


def test_bench_smoke_json_schema_with_reference(tiny_chat_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--smoke", "--model", str(tiny_chat_dir), "--out", str(out)])
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    _check_rows(data, with_reference=True)
    e2e = data["rows"][-1]
    # demo config, one passage, K=2: "passage" trains one adapter on the passage alone; implications,
    # rewrite and self_qa train K each; base trains none
    assert e2e["detail"]["passages"] == 1 and e2e["detail"]["k"] == 2
    assert e2e["detail"]["conditions"] == ["base", "passage", "implications", "rewrite", "self_qa"]
    assert e2e["detail"]["adapters_trained"] == 1 + 3 * 2
    assert e2e["ours"] == e2e["detail"]["seconds"] / 2
    cand = next(r for r in data["rows"] if r["name"] == "candidates_k8")["detail"]
    assert cand["memory_together"]["temporaries"] > cand["memory_one_candidate"]["temporaries"] > 0
    printed = capsys.readouterr().out
    assert "| decode_b8 |" in printed and "| e2e_demo |" in printed and "bfloat16" in printed
    assert "candidates_k8 memory" in printed


def test_bench_without_reference(tiny_chat_dir, tmp_path):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--smoke", "--no-reference", "--model", str(tiny_chat_dir),
                                      "--only", "prefill,decode_b1", "--out", str(out)])
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["prefill", "decode_b1"]
    assert all(r["reference"] is None and r["ratio"] is None and r["ours"] > 0 for r in rows)


def test_forward_flops_counts_the_head_once_for_tied_models():
    from seal_jax.lm.config import preset

    cfg = preset("smollm2-135m")
    per_token = (bench.forward_flops(cfg, 1, 1) - 4 * cfg.q_dim * cfg.num_layers) / 2
    assert per_token == cfg.num_parameters()
