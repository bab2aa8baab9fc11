#!/usr/bin/env python
"""Train GPT-2 from scratch or from pre-trained weights: a thin wrapper over `gpt2_training.cli`.

python 01-Full-Fine-Tuning/train.py --config 01-Full-Fine-Tuning/configs/cpu-quickstart.yaml
python 01-Full-Fine-Tuning/train.py --help
torchrun --nproc_per_node=4 01-Full-Fine-Tuning/train.py --config configs/gpt2-small-owt.yaml
python 01-Full-Fine-Tuning/train.py prepare --dataset openwebtext --out data/owt
python 01-Full-Fine-Tuning/train.py plan --preset gpt2-small --gpu_memory_gib 24
"""

import sys
from pathlib import Path

try:
    from gpt2_training.cli import run
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gpt2_training.cli import run

if __name__ == "__main__":
    sys.exit(run())
