"""Benchmarks: seal-jax against Hugging Face transformers on PyTorch, in one process, same threads.

Every entry is a JSON row ``{name, ours, reference, unit, ratio, fraction_of_limit, detail}``; the
machine's limits (float32 and bfloat16 matmul FLOP/s, memory read bandwidth) are measured in the same run,
so each entry can say what fraction of the machine it uses. ``e2e_demo`` times the whole
knowledge-incorporation loop of ``experiments/demo.toml`` (no reference exists, so its reference, ratio
and fraction are null). ``seal-jax bench --help`` lists the options; ``--smoke`` (tiny shapes, one
repeat) and ``--no-reference`` (no transformers/PEFT) exist for schema tests and machines without torch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import seal_jax as sj
from seal_jax import provenance, scaling, throughput, throughput_cli
from seal_jax.ceilings import best_time, matmul_flops, read_bandwidth
from seal_jax.scaling import text_chunks
from seal_jax.selfedit.knowledge import run_knowledge
from seal_jax.selfedit.run_config import RunConfig


@dataclasses.dataclass
class BenchRow:
    """One benchmark result; ``ratio = ours / reference`` for rates (higher is better)."""

    name: str
    ours: float
    reference: float | None
    unit: str
    ratio: float | None
    fraction_of_limit: float | None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


def forward_flops(config: Any, batch: int, length: int) -> float:
    """Matmul FLOPs of one full forward with logits at every position (attention counted unmasked)."""
    c = config
    per_token = 2 * (c.num_parameters() - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2))
    per_token += 2 * c.vocab_size * c.hidden_size  # the output head
    attention = 2 * 2 * batch * length * length * c.q_dim * c.num_layers
    return per_token * batch * length + attention


def _rate(amount: float, seconds: float | None) -> float | None:
    return None if seconds is None else amount / seconds


def _ratio(reference_s: float | None, ours_s: float) -> float | None:
    return None if reference_s is None else reference_s / ours_s


def bench_prefill(lm: Any, hf_model: Any, *, batch: int, length: int, repeats: int, peak: float) -> BenchRow:
    """Forward tokens/s at ``[batch, length]`` (full logits), ours vs transformers' forward (if given)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, lm.config.vocab_size, (batch, length))
    ours_t = best_time(lambda: lm.forward(ids).block_until_ready(), repeats)
    ref_t = None
    if hf_model is not None:
        import torch  # deferred: torch is optional (the test extra); only the transformers reference uses it

        ids_t = torch.tensor(ids)

        def reference() -> None:
            with torch.inference_mode():
                hf_model(input_ids=ids_t)

        ref_t = best_time(reference, repeats)
    tokens = batch * length
    return BenchRow(
        name="prefill",
        ours=tokens / ours_t,
        reference=_rate(tokens, ref_t),
        unit="tok/s",
        ratio=_ratio(ref_t, ours_t),
        fraction_of_limit=forward_flops(lm.config, batch, length) / ours_t / peak,
        detail={
            "batch": batch,
            "length": length,
            "ours_s": ours_t,
            "reference_s": ref_t,
            "limit": "float32 matmul FLOP/s",
        },
    )


def _hf_generate(hf_model: Any, rows: list[list[int]], new_tokens: int, pad_id: int) -> None:
    import torch  # deferred: optional reference dependency, as in bench_prefill

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id)


def bench_decode(lm: Any, hf_model: Any, *, batch: int, new_tokens: int, repeats: int, bandwidth: float,
                 warmup: int = 1) -> BenchRow:
    """Greedy tokens/s at ``batch`` rows × ``new_tokens`` (``ignore_eos``), ours vs transformers' generate.

    The limit is memory bandwidth: a decode step must read every weight once, so at most
    ``bandwidth / weight_bytes`` steps per second.
    """
    rng = np.random.default_rng(1)
    rows = [rng.integers(100, lm.config.vocab_size, 12 + 3 * (i % 4)).tolist() for i in range(batch)]
    params = sj.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ours_t = best_time(lambda: lm.generate_ids(rows, params), repeats, warmup)
    ref_t = None
    if hf_model is not None:
        ref_t = best_time(lambda: _hf_generate(hf_model, rows, new_tokens, lm._pad_id()), max(1, repeats - 1))
    weight_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in lm.param_structs().values())
    steps_limit = bandwidth / weight_bytes
    return BenchRow(
        name=f"decode_b{batch}", ours=batch * new_tokens / ours_t, reference=_rate(batch * new_tokens, ref_t),
        unit="tok/s", ratio=_ratio(ref_t, ours_t), fraction_of_limit=(new_tokens / ours_t) / steps_limit,
        detail={"batch": batch, "new_tokens": new_tokens, "ours_s": ours_t, "reference_s": ref_t,
                "limit": "memory read bandwidth / weight bytes per step", "weight_bytes": weight_bytes},
    )


def _train_flops(config: Any, tokens: int) -> float:
    """Matmul FLOPs of LoRA training: forward (2N) plus activation gradients (2N) per token."""
    c = config
    dense = c.num_parameters() - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return 4 * (dense + c.vocab_size * c.hidden_size) * tokens


def _peft_train(hf_model: Any, tokenizer: Any, texts: list[str], batch: int, rank: int, alpha: float) -> float:
    """Seconds for one epoch of PEFT LoRA (q/v) + torch AdamW over ``texts`` in batches of ``batch``."""
    import torch  # deferred: torch and peft are optional (the test extra); only the PEFT reference uses them
    from peft import LoraConfig, get_peft_model  # deferred: as torch

    model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def epoch() -> None:
        for i in range(0, len(enc), batch):
            rows = enc[i:i + batch]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

    return best_time(epoch, 1, warmup=1)


def bench_lora_train(lm: Any, hf_model: Any, *, batch: int, length: int, steps: int, peak: float,
                     warmup: int = 1) -> BenchRow:
    """Training tokens/s of one candidate (q/v rank 32, batch × length), ours vs HF + PEFT + torch AdamW."""
    texts = text_chunks(lm, batch * steps, length)
    tokens = sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    lora = sj.LoraSpec(rank=32, alpha=64.0)
    spec = sj.TrainSpec(learning_rate=1e-3, epochs=1, batch_size=batch, max_len=length + 8, shuffle=False)
    ours_t = best_time(lambda: lm.train_adapters([texts], lora, spec), 1, warmup=warmup)
    ref_t = None if hf_model is None else _peft_train(hf_model, lm.tokenizer, texts, batch, 32, 64.0)
    return BenchRow(
        name="lora_train", ours=tokens / ours_t, reference=_rate(tokens, ref_t), unit="tok/s",
        ratio=_ratio(ref_t, ours_t),
        fraction_of_limit=_train_flops(lm.config, tokens) / ours_t / peak,
        detail={"batch": batch, "length": length, "steps": steps, "tokens": tokens, "ours_s": ours_t,
                "reference_s": ref_t, "limit": "float32 matmul FLOP/s"},
    )


def bench_candidates(lm: Any, *, k: int, sequences: int, length: int, epochs: int, peak: float,
                     warmup: int = 1) -> BenchRow:
    """K candidates with SEAL-like data (batch 1) in one program vs the same K trained one after another."""
    texts = text_chunks(lm, k * sequences, length)
    data = [texts[i * sequences:(i + 1) * sequences] for i in range(k)]
    tokens = epochs * sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    lora = sj.LoraSpec(rank=32, alpha=64.0)
    specs = [sj.TrainSpec(learning_rate=1e-3, epochs=epochs, max_len=length + 8, seed=i) for i in range(k)]
    together = best_time(lambda: lm.train_adapters(data, lora, specs), 1, warmup=warmup)

    def one_by_one() -> None:
        for i in range(k):
            lm.train_adapters([data[i]], lora, specs[i])

    alone = best_time(one_by_one, 1, warmup=warmup)
    memory_together = lm.training_memory(data, lora, specs)
    memory_one = max((lm.training_memory([data[i]], lora, specs[i]) for i in range(k)), key=lambda m: m["total"])
    return BenchRow(
        name=f"candidates_k{k}", ours=tokens / together, reference=tokens / alone, unit="tok/s",
        ratio=alone / together, fraction_of_limit=_train_flops(lm.config, tokens) / together / peak,
        detail={"k": k, "sequences": sequences, "length": length, "epochs": epochs, "together_s": together,
                "one_after_another_s": alone, "reference": "the same K trained one after another by seal-jax",
                "limit": "float32 matmul FLOP/s", "memory_together": memory_together,
                "memory_one_candidate": memory_one},
    )


def demo_bench_config(config_path: str | Path, model: str | Path, *, passages: int, k: int, smoke: bool = False) -> Any:
    """The run config of ``config_path`` (the demo) on ``model`` with ``passages`` passages and ``k`` self-edits.

    ``smoke`` shortens every generation and trains one epoch (schema tests on tiny random models) and drops
    the ``template`` condition (its meta-prompt does not fit a tiny model's context); the other
    conditions, LoRA and grader stay those of the file.
    """
    config = RunConfig.from_toml(config_path)
    changes: dict[str, Any] = {"model": str(model), "k": k, "data": {**config.data, "n": passages}}
    if smoke:
        changes["selfedit_sampling"] = {**config.selfedit_sampling, "max_new_tokens": 16}
        changes["eval_max_new_tokens"] = 8
        changes["train"] = {**config.train, "epochs": 1, "max_len": 64}
        changes["conditions"] = tuple(c for c in config.conditions if c != "template")
    return dataclasses.replace(config, **changes)


def bench_e2e(lm: Any, config: Any, *, warmup: bool = True) -> BenchRow:
    """Wall seconds per passage per candidate of a whole knowledge-incorporation run (``run_knowledge``).

    The run (self-edit sampling for every condition, K-candidate LoRA training, answering under the K
    adapters, grading) goes once as a warm-up (compilation) and is then timed on the same passages in a
    fresh folder. No reference implementation exists, so reference, ratio and fraction are ``None``.
    """
    root = Path(tempfile.mkdtemp(prefix="seal-jax-bench-"))
    try:
        if warmup:
            run_knowledge(config, root / "warmup", lm=lm, progress=False)
        t0 = time.perf_counter()
        summary = run_knowledge(config, root / "timed", lm=lm, progress=False)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (root / "timed" / "results.jsonl").read_text().splitlines() if line]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    passages = len({r["passage_id"] for r in rows})
    adapters = sum(1 for r in rows if r["condition"] != "base")
    return BenchRow(
        name="e2e_demo", ours=seconds / (passages * config.k), reference=None, unit="s/passage/candidate",
        ratio=None, fraction_of_limit=None,
        detail={"passages": passages, "k": config.k, "conditions": list(config.conditions), "seconds": seconds,
                "seconds_per_passage": seconds / passages, "adapters_trained": adapters,
                "seconds_per_adapter": seconds / max(1, adapters), "warmup": warmup,
                "epochs": config.train.get("epochs"), "selfedit_max_new_tokens":
                config.selfedit_sampling.get("max_new_tokens"),
                "accuracy": {name: c["accuracy"] for name, c in summary["conditions"].items()}},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``seal-jax bench`` options to ``parser``."""
    parser.add_argument("--model", default="checkpoints/smollm2-135m-instruct", help="HF-format model folder")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller shapes; skips e2e_demo unless --only names it")
    parser.add_argument("--out", default=None, help="write the JSON rows to this file")
    parser.add_argument("--only", default=None, help=f"comma-separated benchmark names to run ({', '.join(BENCHMARKS)}; "
                        "with --preset or --random-weights, the SEAL-workload suite's rows: "
                        f"{', '.join(throughput.SuiteShapes().row_names())}, the 5 being K (--candidates); "
                        "with --scaling: candidates, seq_len, depth)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one repeat, no warm-up: checks that every entry runs (tests), not speed")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers / PEFT (reference = null)")
    parser.add_argument("--scaling", default=None, metavar="DIR",
                        help="run the scaling sweeps instead (cost vs K and sequence length, compile time vs "
                             "depth; --only candidates,seq_len,depth): JSONL rows, PNGs and scaling.md into DIR")
    parser.add_argument("--demo-config", default="experiments/demo.toml",
                        help="run config timed by e2e_demo (its model is replaced by --model)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    throughput_cli.add_arguments(parser)  # the SEAL-workload suite's options (--preset, --random-weights, ...)


BENCHMARKS = ("prefill", "decode_b1", "decode_b8", "decode_b32", "lora_train", "candidates_k8", "e2e_demo")


def print_table(rows: list[BenchRow], machine: dict[str, Any]) -> None:
    """Print the rows as a Markdown table."""
    cores = "core" if machine["cores"] == 1 else "cores"
    print(
        f"\nmachine: {machine['cpu']}, {machine['cores']} {cores}; matmul float32 "
        f"{machine['matmul_flops'] / 1e9:.1f} GFLOP/s, bfloat16 {machine['matmul_flops_bf16'] / 1e9:.1f} GFLOP/s; "
        f"read bandwidth {machine['read_bandwidth'] / 1e9:.1f} GB/s"
    )
    print("| benchmark | seal-jax | reference | unit | ratio | fraction of limit |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        ref = "" if r.reference is None else f"{r.reference:.1f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        frac = "" if r.fraction_of_limit is None else f"{100 * r.fraction_of_limit:.0f}%"
        ours = f"{r.ours:.3g}" if r.ours < 10 else f"{r.ours:.1f}"
        print(f"| {r.name} | {ours} | {ref} | {r.unit} | {ratio} | {frac} |")
    for r in rows:
        if "memory_together" in r.detail:
            together, one = r.detail["memory_together"], r.detail["memory_one_candidate"]
            print(f"{r.name} memory (XLA's analysis of the compiled programs): together "
                  f"{together['total'] / 1e6:.0f} MB ({together['temporaries'] / 1e6:.0f} MB temporaries), "
                  f"largest single candidate {one['total'] / 1e6:.0f} MB ({one['temporaries'] / 1e6:.0f} MB)")


def main(args: argparse.Namespace) -> int:
    """Run the selected benchmarks; print a table; write JSON to ``args.out`` if given.

    With ``args.scaling`` run :mod:`seal_jax.scaling`'s sweeps instead.
    """
    if getattr(args, "scaling", None):
        return scaling.main(args)
    if throughput_cli.wants_suite(args):
        return throughput_cli.main(args)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model at {folder}; run `seal-jax fetch smollm2-135m-instruct` first")
    only = set(args.only.split(",")) if args.only else None
    if only is not None and only - set(BENCHMARKS):
        raise ValueError(f"unknown benchmark(s) in --only: {sorted(only - set(BENCHMARKS))}; the benchmarks are "
                         f"{', '.join(BENCHMARKS)}")
    smoke = getattr(args, "smoke", False)
    with_reference = not getattr(args, "no_reference", False)
    repeats = 1 if smoke else 2 if args.quick else 5
    warmup = 0 if smoke else 1
    code = provenance.code()
    machine: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax_devices": len(jax.devices()),
        "jax": jax.__version__,
    }
    sizes = (256, 512) if smoke else (1024, 2048)
    machine["matmul_flops"] = matmul_flops("float32", sizes, repeats=repeats + 2)
    machine["matmul_flops_bf16"] = matmul_flops("bfloat16", sizes, repeats=repeats + 2)
    machine["read_bandwidth"] = read_bandwidth(32 if smoke else 512, repeats=repeats + 2)
    lm = sj.load(folder, dtype="float32")
    hf_model = None
    if with_reference:
        import torch  # deferred: torch is optional (the test extra); --no-reference runs without it
        from transformers import AutoModelForCausalLM  # deferred: ~1 s to import; only the reference needs it

        torch.set_num_threads(args.threads)
        machine.update(torch_threads=torch.get_num_threads(), torch=torch.__version__)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows: list[BenchRow] = []
    peak, bandwidth = machine["matmul_flops"], machine["read_bandwidth"]

    class Rows(list):  # each finished row is printed and saved at once, so a killed bench keeps them
        def append(self, row: BenchRow) -> None:
            super().append(row)
            ratio = "" if row.ratio is None else f" ({row.ratio:.2f}× the reference)"
            print(f"{row.name}: {row.ours:.4g} {row.unit}{ratio}", flush=True)
            write(self)

    def write(done: list[BenchRow]) -> None:
        if args.out:  # written beside, then renamed: a kill never leaves a half-written file
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps({"code": code, "machine": machine, "rows": [dataclasses.asdict(r) for r in done]}, indent=2))
            tmp.replace(out)

    rows = Rows()

    def want(name: str) -> bool:
        return only is None or name in only

    if want("prefill"):
        batch, length = (2, 32) if smoke else (8, 128) if args.quick else (8, 256)
        rows.append(bench_prefill(lm, hf_model, batch=batch, length=length, repeats=repeats, peak=peak))
    for batch in (1, 8, 32):
        if want(f"decode_b{batch}"):
            rows.append(bench_decode(lm, hf_model, batch=batch, new_tokens=8 if smoke else 32 if args.quick else 128,
                                     repeats=repeats, bandwidth=bandwidth, warmup=warmup))
    if want("lora_train"):
        batch, length, steps = (1, 32, 2) if smoke else (4, 128, 2) if args.quick else (4, 256, 4)
        rows.append(bench_lora_train(lm, hf_model, batch=batch, length=length, steps=steps, peak=peak, warmup=warmup))
    if want("candidates_k8"):
        sequences, length, epochs = (2, 32, 1) if smoke else (4, 64, 1) if args.quick else (8, 64, 2)
        rows.append(bench_candidates(lm, k=8, sequences=sequences, length=length, epochs=epochs, peak=peak,
                                     warmup=warmup))
    # e2e_demo alone takes two demo passages' time (warm-up + timed), too long for --quick's 5 minutes
    if want("e2e_demo") and (not args.quick or (only is not None and "e2e_demo" in only)):
        config = demo_bench_config(args.demo_config, folder, passages=1 if smoke or args.quick else 2, k=2,
                                   smoke=smoke)
        rows.append(bench_e2e(lm, config, warmup=not smoke))
    print_table(rows, machine)
    write(rows)
    return 0
