"""What LoRA training holds in memory under each remat policy, on this machine (BENCHMARKS.md, "Training memory").

A demo-sized training call on the bundled model: 9 candidates (a passage's conditions), each a ~220-token
text plus a shorter one, 4 epochs, batch 1, LoRA r=32 on q/v, float32. For each of ``remat = "none"``,
``"minimal"`` (the default) and ``"full"`` it prints, from a fresh process each:

* the training program's temporaries per XLA's memory analysis (``LM.training_memory``);
* the seconds of the second of two identical calls (the first compiles);
* the process's peak resident memory (``ru_maxrss``), which includes the weights, the runtime and what
  the allocator keeps.

    python experiments/training_memory.py [--model checkpoints/smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


def one(model: str, remat: str) -> dict[str, float]:
    """The three figures for one policy (run in its own process by :func:`main`)."""
    import seal_jax as sj  # deferred: the parent process only starts children

    lm = sj.load(model, dtype="float32", remat=remat, progress=False)
    text = "The quick brown fox jumps over the lazy dog. " * 40
    sequences = [[text[: 900 + 10 * i], "passage text " * 30] for i in range(9)]
    lora = sj.LoraSpec(rank=32, alpha=64.0, targets=("q_proj", "v_proj"))
    train = sj.TrainSpec(learning_rate=3e-3, epochs=4, batch_size=1, max_len=256)
    temporaries = lm.training_memory(sequences, lora, train)["temporaries"]
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        lm.train_adapters(sequences, lora, train)
        seconds.append(time.perf_counter() - t0)
    return {"remat": remat, "temporaries_gb": temporaries / 1e9, "train_s": seconds[1],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one policy
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one)))
        return
    print("| remat | program temporaries | training call (s) | process peak RSS |")
    print("|---|---:|---:|---:|")
    for remat in ("none", "minimal", "full"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--one", remat], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {remat} | {r['temporaries_gb']:.2f} GB | {r['train_s']:.1f} | {r['peak_rss_gb']:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
