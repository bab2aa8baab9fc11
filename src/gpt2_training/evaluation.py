"""Held-out evaluation (loss, perplexity, bits per byte) and text samples, as the engine runs them during and after
training; the notebook writes the same two loops in its cells and a test checks that they agree."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .metrics import bits_per_byte, token_byte_lengths
from .progress import bar as progress_bar


class Evaluator:
    """Evaluates the training model (each process its share, sums reduced) or a loss-computing copy (this process
    alone), and samples text from the prompts. `stop_requested` says a SIGTERM/SIGINT has arrived."""

    def __init__(
        self,
        lm: torch.nn.Module,
        tokenizer: Any,
        val_seqs: np.ndarray,
        *,
        acc: Any,
        autocast: Callable[[], Any],
        batch_size: int,
        show_progress: bool,
        stop_requested: Callable[[], bool],
    ):
        self.lm, self.tokenizer, self.val_seqs, self.acc = lm, tokenizer, val_seqs, acc
        self.autocast, self.batch_size = autocast, batch_size
        self.show_progress, self.stop_requested = show_progress, stop_requested
        self.token_bytes = token_byte_lengths(tokenizer)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, alone: bool = False) -> dict[str, float] | None:
        """Held-out loss, perplexity and bits per byte of `model` (which returns the mean loss of a batch).
        None when a SIGTERM/SIGINT arrives meanwhile: the run must save and exit within seconds, not finish a
        long evaluation first (single process only: with several, ranks hold different numbers of batches and
        could not agree on where to stop, so they finish the evaluation and stop at the next step).
        `alone`: a copy (a 16-bit export's) measured by this process on every sequence, in its own dtype."""
        world, rank = (1, 0) if alone else (self.acc.num_processes, self.acc.process_index)
        device = self.acc.device
        self.lm.eval()
        seqs = torch.from_numpy(self.val_seqs[rank::world])
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        bs = self.batch_size
        # Through the wrapped model, because under FSDP and ZeRO-3 a forward gathers the sharded weights, and
        # every process runs as many forwards as the one with the most sequences (an empty share repeats a
        # sequence and does not count it), since each forward is then a collective.
        longest = -(-len(self.val_seqs) // world)
        # shown only when an evaluation lasts more than two seconds
        bar = progress_bar(
            -(-longest // bs), "eval", enabled=self.show_progress, unit="batch", delay=2.0, leave=False
        )
        for i in range(0, longest, bs):
            if bar is not None:
                bar.update(1)
            if world == 1 and self.stop_requested():
                self.lm.train()
                return None
            x = seqs[i : i + bs].to(device)
            with contextlib.nullcontext() if alone else self.autocast():
                mean = model(x if len(x) else torch.from_numpy(self.val_seqs[:1]).to(device))
            if not len(x):
                continue
            targets = x[:, 1:].reshape(-1)
            sums += torch.tensor(
                [mean.item() * len(targets), len(targets), self.token_bytes[targets.cpu()].sum().item()],
                dtype=torch.float64,
                device=device,
            )
        if bar is not None:
            bar.close()
        if world > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        self.lm.train()
        nats, tokens, n_bytes = sums.tolist()
        loss = nats / max(tokens, 1)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50)),
            "eval_bpb": bits_per_byte(nats, n_bytes),
        }

    @torch.no_grad()
    def sample(self, prompts: list[str], max_new_tokens: int, seed: int = 0) -> list[str]:
        """Text from `prompts`; the RNG is forked so sampling never changes the training run."""
        out = []
        device, eos = self.acc.device, self.tokenizer.eos_token_id
        self.lm.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                if ids.shape[1] == 0:
                    ids = torch.tensor([[eos]], device=device)
                gen = self.lm.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    top_k=50,
                    temperature=0.8,
                    pad_token_id=eos,
                    use_cache=True,
                )
                out.append(self.tokenizer.decode(gen[0], skip_special_tokens=True))
        self.lm.train()
        return out
