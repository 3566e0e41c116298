import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dapt.data_mix.store import open_stores, tokenizer_hash
from dapt.pretrain.config import ModelConfig
from dapt.pretrain.evaluate import _eval_stream, heldout_bpb
from dapt.pretrain.model import build_model

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def test_bpb_of_a_uniform_model_is_log2_vocab_per_token(built_experiment):
    """With zero logits every token costs ln V nats: BPB must be tokens · log2 V / bytes exactly."""
    tokenizer = AutoTokenizer.from_pretrained(built_experiment.tokenizer_dir)
    model = build_model(ModelConfig(config=TINY), tokenizer, seed=0, activation_checkpointing=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    stores = open_stores(built_experiment.stores_dir, built_experiment.corpora, "heldout",
                         tokenizer_hash(built_experiment.tokenizer_dir))
    max_tokens = 3000
    bpb = heldout_bpb(model, stores, seq_len=64, max_tokens=max_tokens, batch_size=4, device=torch.device("cpu"))
    for name, store in stores.items():
        stream, num_bytes = _eval_stream(store, max_tokens)
        expected = (len(stream) - 1) * math.log2(len(tokenizer)) / num_bytes
        assert bpb[name] == pytest.approx(expected, rel=1e-6)
        assert len(stream) - 1 == int(store.doc_ends[np.searchsorted(store.doc_ends, max_tokens, side="right") - 1])



def test_bpb_through_the_stores_text_equals_the_stores_own_with_the_same_tokenizer(built_experiment):
    """`retokenized_bpb` gives the documents back as text and encodes them again: with the stores' own
    tokenizer that is the same stream and the same bytes, so the same BPB as `heldout_bpb`."""
    from dapt.pretrain.evaluate import retokenized_bpb

    tokenizer = AutoTokenizer.from_pretrained(built_experiment.tokenizer_dir)
    model = build_model(ModelConfig(config=TINY), tokenizer, seed=0, activation_checkpointing=False)
    stores = open_stores(built_experiment.stores_dir, built_experiment.corpora, "heldout",
                         tokenizer_hash(built_experiment.tokenizer_dir))
    settings = {"seq_len": 64, "max_tokens": 2000, "batch_size": 4, "device": torch.device("cpu")}
    own = heldout_bpb(model, stores, **settings)
    assert retokenized_bpb(model, tokenizer, tokenizer, stores, **settings) == pytest.approx(own, rel=1e-9)
