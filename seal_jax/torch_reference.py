"""The PyTorch reference of ``seal-jax bench``'s SEAL-workload suite (:mod:`seal_jax.throughput`):
transformers ``generate`` and transformers + PEFT + torch AdamW LoRA training, at the suite's shapes with
random weights, on a CPU or one CUDA GPU. torch, transformers and PEFT are optional (the test extra), so
each is imported where it is first needed."""

from __future__ import annotations

import time
import warnings
from typing import Any


class Reference:
    """transformers + PEFT + torch AdamW on the same shapes with random weights (CPU or one CUDA GPU)."""

    def __init__(self, config: Any, dtype: str, device: str, threads: int | None = None):
        import torch  # deferred: torch is optional (the test extra); only the reference uses it
        from transformers import AutoConfig, AutoModelForCausalLM  # deferred: ~1 s to import, as torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        hf = config.to_hf_dict()
        hf_config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # created in the run's dtype (no float32 copy of an 8B model)
        try:
            with torch.device(device):
                self.model = AutoModelForCausalLM.from_config(hf_config).eval()
        finally:
            torch.set_default_dtype(default)
        self.pad_id = int(config.pad_token_id or 0)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def generate(self, rows: list[list[int]], new_tokens: int,
                 sampling: dict[str, float] | None = None) -> list[list[int]]:
        """``generate`` of exactly ``new_tokens`` tokens after each row (left-padded): greedy, or sampled with
        ``sampling``'s ``temperature`` and ``top_p`` (the suite passes SEAL's self-edit sampling). Returns
        the new tokens of each row, on the host (as seal-jax's ``generate_ids`` returns them)."""
        torch = self.torch
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        with torch.inference_mode():
            # top_k=0: transformers' default top-k 50 off, as seal-jax (and SEAL's vLLM) sample with top-p alone
            knobs = dict(do_sample=True, top_k=0, **sampling) if sampling else dict(do_sample=False)
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.pad_id, **knobs)
        return out[:, width:].tolist()

    def train_seconds(self, sequences: list[list[int]], epochs: int, rank: int, warmup_steps: int = 1) -> float:
        """Seconds of one candidate's LoRA (q/v) + AdamW training, batch 1, ``epochs`` over ``sequences``."""
        from peft import LoraConfig, get_peft_model  # deferred: optional reference dependency

        torch = self.torch
        with warnings.catch_warnings():  # PEFT calls a transformers method that warns of its own deprecation
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(self.model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        batches = [torch.tensor([s], device=self.device) for s in sequences]

        def step(ids: Any) -> None:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        for ids in batches[:warmup_steps]:
            step(ids)
        self._sync()
        start = time.perf_counter()
        for _ in range(epochs):
            for ids in batches:
                step(ids)
        self._sync()
        seconds = time.perf_counter() - start
        self.model = model.unload()  # the base model again, without adapter layers
        self.model.eval()
        return seconds


