"""Where the engine's step time goes on a CPU: `make train`'s recipe for a few steps under cProfile, one thread,
grouped into the parts a peer's loop also pays (the blocks' forward, the backward, the optimizer) and the parts it
may not (the output layer and loss, the GELU, data, logging). Prints the shares and the top calls.

    .venv/bin/python bench/profile_step.py [--steps 40]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (part, where its time is counted: cumulative time of functions whose file:name contains this)
PARTS = {
    "backward (autograd)": "run_backward",
    "output layer + loss (model.py chunked cross-entropy)": "model.py:{loss_line}(forward)",
    "GPT-2 tanh-GELU (transformers activations.py, torch's C++ kernel)": "activations.py:",
    "attention (SDPA)": "scaled_dot_product_attention",
    "optimizer step": "adam.py",
    "gradient clipping": "clip_grad",
    "data (tokenize, pack, batch)": "(_next_batch)",
    "logging": "(_log)",
}


def main() -> int:
    from gpt2_training.cli import parse_config
    from gpt2_training.trainer import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(
            ["--config", str(ROOT / "01-Full-Fine-Tuning/configs/cpu-quickstart.yaml")],
            output_dir=tmp,
            max_steps=a.steps,
            eval_steps=0,
            save_steps=0,
            sample_max_new_tokens=0,
            plot=False,
            save_final_model=False,
            disable_tqdm=True,
            logging_steps=10,
            resume="never",
            overwrite_output_dir=True,
        )
        profile = cProfile.Profile()
        profile.enable()
        train(cfg)
        profile.disable()
    from gpt2_training.model import _ChunkedLinearCrossEntropy

    loss_line = _ChunkedLinearCrossEntropy.forward.__code__.co_firstlineno  # the line cProfile names it by
    stats = pstats.Stats(profile)
    loop = next(v[3] for k, v in stats.stats.items() if k[2] == "train" and k[0].endswith("trainer.py"))
    print(f"load average {os.getloadavg()}; training loop {loop:.1f} s for {a.steps} steps")
    for part, key in PARTS.items():
        key = key.format(loss_line=loss_line)
        spent = max((v[3] for k, v in stats.stats.items() if key in f"{k[0]}:{k[1]}({k[2]})"), default=0.0)
        print(f"{100 * spent / loop:5.1f}%  {part}")
    stats.sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
