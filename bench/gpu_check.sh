#!/usr/bin/env bash
# ONE prepared GPU check for a lent H100/H200 session; total < 11 minutes, every step under its own timeout.
#
# Installs NOTHING. Needs a Python with a CUDA build of torch, transformers, accelerate, tokenizers, numpy,
# safetensors, tqdm and pyyaml (the project's requirements/lock.txt); uses bitsandbytes (8-bit row of the memory
# grid) and DeepSpeed (ZeRO smoke) only if they are already installed. Set PYTHON to choose the interpreter.
# Works offline: the engine rows use the built-in corpus and a BPE trained on it (cached in GPT2_TRAINING_CACHE).
#
#     OUT=/some/dir bash bench/gpu_check.sh        # outputs go to $OUT, else bench/results
#
# Budget: training benchmark with all four measurements + memory grid <= 330 s (four torch.compile warm-ups of
# gpt2-small are most of it), planner GPU test <= 60 s, DeepSpeed and FSDP 2-step smokes <= 45 s each, gpt2-small
# Muon against AdamW (eager, the first run also trains the tokenizer) <= 180 s.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export GPT2_TRAINING_CACHE=${GPT2_TRAINING_CACHE:-/tmp/gpt2_training_cache}
start=$(date +%s)
status() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/gpu_check.log"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"

status "1/5 training benchmark (seed, recipe, reference, engine vs raw) + memory grid, gpt2-small, seq 1024"
timeout 330 $PY bench/bench_training.py --device cuda --preset gpt2-small --seq_len 1024 --micro_batch 16 \
  --steps 20 --warmup 5 --engine_steps 30 --repeats 1 --memory_grid --out "$OUT/training-gpu.json" \
  > "$OUT/training-gpu.stdout" 2> "$OUT/training-gpu.log"
status "bench_training exit $?"; cat "$OUT/training-gpu.md" 2>/dev/null

status "2/5 planner: measured vs predicted on the GPU (pytest -m gpu)"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_planner.py -k gpu > "$OUT/pytest-gpu.log" 2>&1
status "pytest exit $?"; tail -3 "$OUT/pytest-gpu.log"

SMOKE=(01-Full-Fine-Tuning/train.py --config 01-Full-Fine-Tuning/configs/tiny.yaml --max_steps 2 --save_steps 2
       --eval_steps 0 --plot false --save_final_model false --sample_max_new_tokens 4 --eval_max_sequences 8
       --resume never --overwrite_output_dir --report_to none)
# Pending GPU checks of the scale-out backends (tests/test_distributed.py runs them on CPU with gloo; here they
# meet CUDA, NCCL and bf16): one GPU means one process, so NCCL's collectives across GPUs stay pending.
if $PY -c "import deepspeed" 2>/dev/null; then
  status "3/5 DeepSpeed ZeRO-3 bf16 smoke (1 process, 2 steps, the shipped JSON)"
  timeout 45 $PY -m torch.distributed.run --standalone --nproc_per_node 1 "${SMOKE[@]}" \
    --deepspeed 01-Full-Fine-Tuning/configs/ds_zero3.json --precision bf16 --output_dir "$OUT/smoke-deepspeed" \
    > "$OUT/smoke-deepspeed.log" 2>&1
  status "deepspeed smoke exit $?"; tail -3 "$OUT/smoke-deepspeed.log"
else
  status "3/5 DeepSpeed not installed (make install-deepspeed): ZeRO smoke skipped"
fi

status "4/5 FSDP2 bf16 smoke through accelerate launch and the shipped config (1 process, 2 steps)"
timeout 45 $PY -m accelerate.commands.launch --config_file 01-Full-Fine-Tuning/configs/accelerate_fsdp.yaml \
  --num_processes 1 "${SMOKE[@]}" --precision bf16 --output_dir "$OUT/smoke-fsdp" > "$OUT/smoke-fsdp.log" 2>&1
status "fsdp smoke exit $?"; tail -3 "$OUT/smoke-fsdp.log"

# Muon at gpt2-small scale: the step's cost beside AdamW (Newton-Schulz on 768 x 768 and 768 x 3072 blocks in
# bf16) and the loss after the same 60 steps, same data and seed; one learning rate serves both (optim.py).
status "5/5 gpt2-small Muon vs AdamW, bf16, 60 steps each, built-in corpus"
for opt in adamw_torch_fused muon; do
  timeout 90 $PY 01-Full-Fine-Tuning/train.py --preset gpt2-small --dataset builtin --tokenizer_vocab_size 8192 \
    --block_size 1024 --per_device_train_batch_size 16 --max_steps 60 --warmup_steps 10 --learning_rate 2e-3 \
    --optim $opt --precision bf16 --logging_steps 10 --eval_steps 0 --save_steps 0 \
    --eval_max_sequences 64 --sample_max_new_tokens 0 --plot false --save_final_model false --report_to none \
    --resume never --overwrite_output_dir --output_dir "$OUT/muon-$opt" > "$OUT/muon-$opt.log" 2>&1
  status "gpt2-small $opt exit $?"; grep -E "^\[train\].*step=60|held-out|tokens/s" "$OUT/muon-$opt.log" | tail -3
done

rm -rf "$OUT/smoke-deepspeed" "$OUT/smoke-fsdp" "$OUT"/muon-adamw_torch_fused "$OUT"/muon-muon
status "done in $(( $(date +%s) - start )) s; results in $OUT"
