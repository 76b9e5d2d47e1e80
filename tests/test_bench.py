"""`seal-jax bench --quick` on a tiny model: every entry runs and the JSON has the documented schema."""

from __future__ import annotations

import json

from seal_jax import bench
from seal_jax.cli import build_parser

ROW_KEYS = {"name", "ours", "reference", "unit", "ratio", "fraction_of_limit", "detail"}


def test_bench_quick_json_schema(tiny_chat_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--quick", "--model", str(tiny_chat_dir), "--out", str(out)])
    assert bench.main(args) == 0
    data = json.loads(out.read_text())
    assert {"matmul_flops", "read_bandwidth", "cores"} <= set(data["machine"])
    names = [r["name"] for r in data["rows"]]
    assert names == ["prefill", "decode_b1", "decode_b8", "decode_b32", "lora_train", "candidates_k8"]
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["ours"] > 0 and row["reference"] > 0 and row["ratio"] > 0 and row["fraction_of_limit"] > 0
        assert abs(row["ratio"] - row["ours"] / row["reference"]) < 1e-6 * row["ratio"]
    assert "| decode_b8 |" in capsys.readouterr().out


def test_forward_flops_counts_the_head_once_for_tied_models():
    from seal_jax.lm.config import preset

    cfg = preset("smollm2-135m")
    per_token = (bench.forward_flops(cfg, 1, 1) - 4 * cfg.q_dim * cfg.num_layers) / 2
    assert per_token == cfg.num_parameters()
