"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) against HF transformers.

HF loads the same GGUF and dequantizes it to fp32; lmengine computes on the quantized blocks with
8-bit activations, so logits differ slightly and top-1 agreement, not equality, is the measure.
"""

from __future__ import annotations

import numpy as np
import pytest

from real_model_checks import hf_greedy_ids, top1_agreement

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_POSITIONS = 320  # teacher-forced positions of real English text
MIN_TOP1_AGREEMENT = 0.98
GREEDY_PREFIX = 16  # greedy tokens that must equal HF's exactly


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf_path):
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def text_ids(smollm2, english_text):
    ids = smollm2.tokenizer.encode(english_text)
    assert len(ids) > N_POSITIONS
    return ids[:N_POSITIONS]


@pytest.fixture(scope="module")
def hf_logits(hf_model, text_ids):
    with torch.no_grad():
        return hf_model(torch.tensor([text_ids])).logits[0].float().numpy()


def test_top1_agreement_prefill(smollm2, text_ids, hf_logits):
    ours = smollm2.logits(text_ids)
    assert ours.shape == hf_logits.shape
    assert top1_agreement(ours, hf_logits) >= MIN_TOP1_AGREEMENT


def test_top1_agreement_decode_path(smollm2, text_ids, hf_logits):
    # 32 tokens of prefill, then every later position fed alone as generation does.
    ours = smollm2.logits(text_ids, prefill=32)
    assert top1_agreement(ours, hf_logits) >= MIN_TOP1_AGREEMENT


def test_prefill_and_decode_paths_agree(smollm2, text_ids):
    a = smollm2.logits(text_ids[:96])
    b = smollm2.logits(text_ids[:96], prefill=1)
    # Same weights, same activation quantization; only summation order may differ.
    assert np.max(np.abs(a - b)) <= 1e-3 * (a.max() - a.min())


@pytest.mark.parametrize(
    "prompt",
    [
        "The capital of France is",
        "Licensed under the Apache License, Version 2.0",
        "def fibonacci(n):",
    ],
)
def test_greedy_continuation_matches_hf(smollm2, hf_model, prompt):
    from lmengine import SamplingParams

    ids = smollm2.tokenizer.encode(prompt)
    ours = smollm2.generate_ids(
        ids, SamplingParams(max_tokens=GREEDY_PREFIX, temperature=0, ignore_eos=True)
    )
    assert ours.token_ids == hf_greedy_ids(hf_model, ids, GREEDY_PREFIX)
