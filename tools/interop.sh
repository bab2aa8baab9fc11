#!/usr/bin/env bash
# `make test-interop`: train a tiny model with this project's environment, then check the final folder with the
# consumers users hand it to, installed apart in .venv-interop (transformers 4.46, optimum's ONNX export with
# ONNX Runtime, llama.cpp's GGUF converter taken from the llama-cpp-python source release, which vendors it).
# Not part of `make test`: it installs ~1 GB of packages on its first run.
set -euo pipefail

VPY=${VPY:-.venv/bin/python}
PYTHON=${PYTHON:-python3}
IVENV=${IVENV:-.venv-interop}
WORK=${WORK:-build/interop}
# the versions checked; torch is the project's own (its CPU or CUDA build, whichever is installed)
TORCH=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
PINS=("torch==$TORCH" "transformers==4.46.3" "optimum-onnx==0.1.0" "optimum==2.1.0" "onnxruntime==1.32.0"
      "onnx==1.23.2" "accelerate==1.16.0" "gguf==0.19.0")
LLAMA_CPP_PYTHON=0.3.36

stamp="$IVENV/.installed-$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  rm -rf "$IVENV"
  "$PYTHON" -m venv "$IVENV"
  "$IVENV/bin/python" -m pip install -q "${PINS[@]}"
  touch "$stamp"
fi

llama="$WORK/llama-cpp-python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
if [ ! -f "$llama/convert_hf_to_gguf.py" ]; then
  mkdir -p "$WORK"
  "$IVENV/bin/python" -m pip download -q --no-binary :all: --no-deps -d "$WORK" "llama-cpp-python==$LLAMA_CPP_PYTHON"
  # the converter, its `conversion` package and gguf-py only: the C++ sources are not built
  tar -xzf "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK" --wildcards \
    "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
  mv "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON" "$WORK/llama-cpp-python-$LLAMA_CPP_PYTHON"
fi

run="$WORK/run"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$VPY" 01-Full-Fine-Tuning/train.py --preset tiny --dataset builtin \
  --tokenizer_vocab_size 1024 --block_size 64 --max_steps 20 --save_steps 0 --eval_steps 0 --precision fp32 \
  --plot false --sample_max_new_tokens 0 --output_dir "$run" --resume never --overwrite_output_dir
echo "== consumers: $("$IVENV/bin/python" -m pip list --format freeze 2>/dev/null |
  grep -iE '^(torch|transformers|optimum|optimum-onnx|onnxruntime|onnx|gguf|accelerate)==' | tr '\n' ' ')" \
  "llama.cpp converter from llama-cpp-python $LLAMA_CPP_PYTHON"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$IVENV/bin/python" tools/interop_check.py "$run/final" "$llama" "$WORK"
echo "test-interop: all checks passed"
