"""--packing keeps sequences apart: the per-token loss of packed rows equals that of padded rows.

    python -m pytest -q tests/unit/test_packing.py

Every attention implementation in training.batching.PACKING_ATTENTION is checked here: sdpa and
eager on CPU, flash_attention_2 (and sdpa on CUDA) in the GPU test, which is skipped without a GPU
or without the flash_attn package.
"""

from __future__ import annotations

import pytest
import torch

from training.batching import PACKING_ATTENTION, PaddingCollator, packing_collator
from training.prompt import IGNORE_INDEX

CPU_ATTENTION = [name for name in PACKING_ATTENTION if name != "flash_attention_2"]


def three_rows(vocab_size: int) -> list[dict[str, list[int]]]:
    """Three rows of different lengths whose first tokens (the "prompt") are masked, as ours are."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in ((9, 4), (23, 10), (5, 2)):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def per_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every labelled token, in order (row by row), as the Trainer's forward sees it."""
    logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
    labels = batch["labels"].to(model.device)[:, 1:].reshape(-1)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    keep = labels != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")


def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def tiny_pythia():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=256))


def packed_matches_padded(model, attention: str, tolerance: float) -> None:
    model.set_attn_implementation(attention)
    model.train()  # the Trainer's mode: no KV cache is wanted, dropout is 0 in these configs
    rows = three_rows(model.config.vocab_size)
    collator = packing_collator(model)
    packed = collator(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, no padding
    with torch.no_grad():
        padded_loss = per_token_loss(model, PaddingCollator(pad_token_id=0)(rows))
        packed_loss = per_token_loss(model, packed)
    assert padded_loss.shape == packed_loss.shape == (
        sum(len(r["input_ids"]) - r["labels"].count(IGNORE_INDEX) for r in rows),)
    assert torch.allclose(packed_loss, padded_loss, atol=tolerance, rtol=0), (packed_loss - padded_loss).abs().max()


@pytest.mark.parametrize("attention", CPU_ATTENTION)
def test_packed_loss_matches_padded_llama(tiny_model_dir, attention):
    packed_matches_padded(tiny_llama(tiny_model_dir), attention, tolerance=1e-4)


@pytest.mark.parametrize("attention", CPU_ATTENTION)
def test_packed_loss_matches_padded_pythia(attention):
    packed_matches_padded(tiny_pythia(), attention, tolerance=1e-4)


def test_the_comparison_catches_sequences_that_see_each_other(tiny_model_dir):
    # Control: the same rows concatenated without restarting position_ids form one long sequence
    # whose later rows attend to the earlier ones; the losses must differ well beyond 1e-4.
    model = tiny_llama(tiny_model_dir)
    rows = three_rows(model.config.vocab_size)
    packed = packing_collator(model)(rows)
    del packed["position_ids"]
    with torch.no_grad():
        difference = per_token_loss(model, packed) - per_token_loss(model, PaddingCollator(0)(rows))
    assert difference.abs().max() > 1e-3


def test_packing_refuses_attention_it_has_not_verified(tiny_model_dir):
    model = tiny_llama(tiny_model_dir)
    model.set_attn_implementation("flex_attention")  # FlexAttention has no backward on CPU
    with pytest.raises(ValueError, match=r"--packing: .*'flex_attention'.*sdpa, eager, flash_attention_2"):
        packing_collator(model)


def test_packing_refuses_models_without_the_shared_mask_code():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="--packing: MambaForCausalLM does not build its attention mask"):
        packing_collator(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_loss_matches_padded_on_cuda(tiny_model_dir, attention):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash_attention_2 needs the flash_attn package")
    # flash attention runs in bf16 only: compare at bf16 precision; sdpa keeps fp32 and 1e-4.
    dtype, tolerance = (torch.bfloat16, 2e-2) if attention == "flash_attention_2" else (torch.float32, 1e-4)
    model = tiny_llama(tiny_model_dir).to("cuda", dtype)
    packed_matches_padded(model, attention, tolerance)
