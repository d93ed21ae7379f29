"""Right padding without a mask: identical real-token outputs for causal models; encoders keep the mask."""
from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from instructrl.models.padding import is_causal, padding_mask, right_pad


def test_right_pad_and_mask():
    ids, lengths = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
    assert padding_mask(lengths, causal=False).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padding_mask(lengths, causal=True) is None


def _rows():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in (9, 3, 6, 1)]


@torch.inference_mode()
def test_causal_model_needs_no_mask_for_right_padding():
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2)).eval()
    assert is_causal(model)
    rows = _rows()
    ids, lengths = right_pad(rows, pad_id=0)
    no_mask = model(input_ids=ids, attention_mask=padding_mask(lengths, True)).last_hidden_state
    masked = model(input_ids=ids, attention_mask=padding_mask(lengths, False)).last_hidden_state
    for i, r in enumerate(rows):  # every real position equals the unpadded sequence's own forward
        alone = model(input_ids=torch.tensor([r])).last_hidden_state[0]
        torch.testing.assert_close(no_mask[i, :len(r)], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked[i, :len(r)], alone, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_bidirectional_encoder_keeps_the_mask():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=1)).eval()
    assert not is_causal(model)
    rows = _rows()
    ids, lengths = right_pad(rows, pad_id=0)
    masked = model(input_ids=ids, attention_mask=padding_mask(lengths, is_causal(model))).last_hidden_state
    no_mask = model(input_ids=ids).last_hidden_state
    r = rows[1]  # a short row: without the mask its real tokens would attend to the padding
    alone = model(input_ids=torch.tensor([r])).last_hidden_state[0]
    torch.testing.assert_close(masked[1, :len(r)], alone, atol=1e-5, rtol=1e-5)
    assert (no_mask[1, :len(r)] - alone).abs().max() > 1e-3
    assert not is_causal(torch.nn.Linear(2, 2))  # no attention module at all: keep the mask
