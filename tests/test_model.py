"""The model: the fused chunked loss equals the plain loss and its gradients; checkpoints are HF models."""

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from gpt2_training.config import ModelArguments
from gpt2_training.model import (
    CausalLMWithLoss,
    build_model,
    chunked_cross_entropy,
    loss_chunk_rows,
    padded_vocab_size,
)


def test_padded_vocab():
    assert padded_vocab_size(50257, 64) == 50304
    assert padded_vocab_size(50257, 1) == 50257


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_cross_entropy_matches_reference_value_and_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (100,))
    ours = chunked_cross_entropy(h, w, t, chunk_size=chunk)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), t)
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-12)
    assert torch.allclose(gh, h.grad, rtol=1e-10) and torch.allclose(gw, w.grad, rtol=1e-10)


def test_loss_chunks_hold_8_mb_of_logits_on_a_cpu_and_4096_rows_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loss_chunk_rows(cpu, 4096) == 512
    assert loss_chunk_rows(cpu, 50304) == 41
    assert loss_chunk_rows(cpu, 2**22) == 1
    assert loss_chunk_rows(gpu, 50304) == 4096
    torch.manual_seed(0)
    h, w, t = torch.randn(1200, 8), torch.randn(4096, 8), torch.randint(0, 4096, (1200,))
    # 1,200 rows are three chunks on a CPU (512 + 512 + 176): the default gives the one-chunk value
    assert torch.allclose(chunked_cross_entropy(h, w, t), chunked_cross_entropy(h, w, t, chunk_size=1200))


def test_scratch_models_use_the_c_kernel_of_gpt2s_tanh_gelu_with_the_same_outputs():
    torch.manual_seed(0)
    lm = build_model(ModelArguments(preset="tiny"), 300, 299)
    assert lm.config.activation_function == "gelu_pytorch_tanh"
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        fast = lm(input_ids=x).logits
        for block in lm.transformer.h:
            block.mlp.act = ACT2FN["gelu_new"]
        python = lm(input_ids=x).logits
    assert torch.allclose(fast, python, atol=1e-5)
    assert not torch.equal(fast, torch.zeros_like(fast))


def test_wrapper_loss_equals_gpt2lmheadmodel_loss():
    torch.manual_seed(0)
    lm = build_model(ModelArguments(preset="tiny"), 300, 299)
    x = torch.randint(0, 300, (2, 32))
    chunked = CausalLMWithLoss(lm, "chunked")(x)
    hf = CausalLMWithLoss(lm, "hf")(x)
    assert torch.allclose(chunked, hf, atol=1e-5)


def test_bf16_autocast_loss_is_close_to_fp32():
    torch.manual_seed(0)
    lm = build_model(ModelArguments(preset="tiny"), 300, 299)
    x = torch.randint(0, 300, (2, 32))
    fp32 = CausalLMWithLoss(lm)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = CausalLMWithLoss(lm)(x)
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.05


def test_init_from_local_checkpoint_resizes_for_a_bigger_tokenizer(tmp_path):
    torch.manual_seed(0)
    lm = build_model(ModelArguments(preset="tiny"), 300, 299)
    lm.save_pretrained(tmp_path / "m")
    again = build_model(ModelArguments(init_from=str(tmp_path / "m")), 300, 299)
    assert all(
        torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values(), strict=True)
    )
    bigger = build_model(ModelArguments(init_from=str(tmp_path / "m")), 400, 399)
    assert bigger.config.vocab_size == 448 and bigger.get_input_embeddings().weight.shape[0] == 448
