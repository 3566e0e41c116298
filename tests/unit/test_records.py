"""Tuning records: a store keeps which tokens the loss covers (completions, assistant turns), records
are packed whole into windows, a packed record reads only itself, and the loss ignores prompts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dapt.base import DaptError
from dapt.data_mix.build import build_store
from dapt.data_mix.config import CorpusConfig, HeldoutConfig
from dapt.data_mix.records import pack, window
from dapt.data_mix.store import TokenStore
from dapt.pretrain.loss import check_packed_records, install_chunked_loss, next_token_loss

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE folder with an EOS token and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["Headline: shares of ACME rose after earnings\nSentiment: positive",
            "Headline: bank cuts outlook\nSentiment: negative", "the market was flat today"] * 50
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def headline(i: int) -> dict:
    return {"prompt": f"Headline: shares of company {i} {'rose' if i % 2 else 'fell'}\nSentiment:",
            "completion": " positive" if i % 2 else " negative"}


def build(tmp_path: Path, tokenizer_dir: Path, records: list, **fields) -> tuple[dict, TokenStore]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    corpus = CorpusConfig(name="sentiment", paths=[str(path)], **{"record_format": "prompt_completion"} | fields)
    manifest = build_store(corpus, HeldoutConfig(fraction=0.2), tokenizer_dir, tmp_path / "stores")
    return manifest, TokenStore(tmp_path / "stores" / "sentiment", "train")


def test_a_record_store_trains_on_completions_and_their_eos_only(tmp_path, tokenizer_dir):
    from dapt.data_mix.build import load_encoder

    encoder, eos = load_encoder(tokenizer_dir)
    manifest, store = build(tmp_path, tokenizer_dir, [headline(i) for i in range(60)])
    assert store.records and manifest["accounting"]["invariant_holds"]
    starts = np.concatenate([[0], store.doc_ends[:-1]])
    for start, end in zip(starts, store.doc_ends):
        tokens, trained = np.asarray(store.tokens[start:end]), np.asarray(store.trained[start:end]).astype(bool)
        assert tokens[-1] == eos and trained[-1]
        completion = encoder.decode(tokens[trained][:-1].tolist())
        prompt = encoder.decode(tokens[~trained].tolist())
        assert completion in (" positive", " negative") and prompt.startswith("Headline:") and prompt.endswith(":")
    statistics = manifest["accounting"]["records"]
    assert statistics["records"] == 60 and statistics["completion_tokens"]["max"] >= 2


def test_over_length_records_are_rejected_or_their_prompt_cut_from_the_left(tmp_path, tokenizer_dir):
    long = {"prompt": "the market was flat today " * 40 + "\nSentiment:", "completion": " negative"}
    records = [headline(i) for i in range(30)] + [long]
    manifest, _ = build(tmp_path / "reject", tokenizer_dir, records, max_tokens=40)
    accounting = manifest["accounting"]
    assert accounting["rejected"] == {"longer_than_max_tokens": 1} and accounting["kept"] == 30
    assert accounting["examples"]["longer_than_max_tokens"][0].endswith("records.jsonl:31")
    assert accounting["invariant_holds"]

    manifest, store = build(tmp_path / "truncate", tokenizer_dir, records, max_tokens=40, over_length="truncate")
    accounting = manifest["accounting"]
    assert accounting["rejected"] == {} and accounting["notes"] == {"prompt_truncated": 1}
    heldout = TokenStore(tmp_path / "truncate" / "stores" / "sentiment", "heldout")
    lengths = [np.diff(np.concatenate([[0], s.doc_ends])) for s in (store, heldout)]
    assert max(max(x) for x in lengths) == 40  # the long one, cut to fit, its completion whole


def test_records_are_packed_whole_and_positions_restart_per_record():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 200)
    ends = np.cumsum(lengths)
    tokens = np.arange(ends[-1]) % 97
    trained = (rng.random(ends[-1]) < 0.3).astype(np.uint8)
    bounds = pack(ends, seq_len=63)
    assert bounds[0] == 0 and bounds[-1] == len(ends) and np.all(np.diff(bounds) > 0)
    starts = np.concatenate([[0], ends[:-1]])
    for w in range(len(bounds) - 1):
        first, last = bounds[w], bounds[w + 1]
        held = ends[last - 1] - starts[first]
        assert held <= 64 and (last == len(ends) or held + lengths[last] > 64)  # full up to the next record
        ids, targets, positions = window(tokens, trained, ends, bounds, w, 63, pad=0)
        assert len(ids) == 64 and len(targets) == len(positions) == 63
        np.testing.assert_array_equal(ids[:held], tokens[starts[first]:ends[last - 1]])
        expected = np.concatenate([np.arange(n) for n in lengths[first:last]] + [np.arange(64 - held)])[:-1]
        np.testing.assert_array_equal(positions, expected)
        assert not targets[held - 1:].any()  # padding is never a target
    with pytest.raises(DaptError, match=r"a record of \d+ tokens does not fit a window of 21"):
        pack(ends, seq_len=20)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_packed_window_gives_each_record_the_loss_it_has_alone(chunk):
    model = tiny_llama()
    install_chunked_loss(model, chunk)
    rng = np.random.default_rng(1)
    records = [rng.integers(1, 211, n) for n in (9, 17, 5)]
    ends = np.cumsum([len(r) for r in records])
    trained = np.concatenate([np.r_[np.zeros(len(r) - 3), np.ones(3)] for r in records]).astype(np.uint8)
    ids, targets, positions = window(np.concatenate(records), trained, ends, np.array([0, 3]), 0, 40, pad=0)
    packed = next_token_loss(model, torch.from_numpy(ids)[None], positions=torch.from_numpy(positions)[None])[1][0]
    for record, start in zip(records, [0, *ends[:-1]]):
        alone = next_token_loss(model, torch.from_numpy(record)[None])[1][0]
        torch.testing.assert_close(packed[start:start + len(record) - 1], alone, rtol=1e-5, atol=1e-5)
    check_packed_records(model, 211, torch.device("cpu"))  # the probe passes what the test passes


def test_the_prompt_gets_no_gradient():
    """Only the trained targets' predictions are trained: the gradient reaching the logits is zero at
    every prompt position, and the loss's gradients are those of the completion tokens alone."""
    model = tiny_llama()
    tokens = torch.randint(1, 211, (2, 25), generator=torch.Generator().manual_seed(2))
    trained = torch.zeros(2, 24)
    trained[:, 15:] = 1
    logits = []

    def keep(module, inputs, output):
        output.retain_grad()
        logits.append(output)

    model.lm_head.register_forward_hook(keep)
    loss, per_token = next_token_loss(model, tokens, trained / trained.sum())
    loss.backward()
    assert logits[0].grad[:, :15].abs().max() == 0 and logits[0].grad[:, 15:].abs().min() > 0
    torch.testing.assert_close(loss, per_token[:, 15:].mean())
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    install_chunked_loss(model, 7)
    next_token_loss(model, tokens, trained / trained.sum())[0].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-5, atol=1e-6)


def test_a_model_that_lets_records_see_each_other_is_refused():
    model = tiny_llama()
    original = model.forward

    def ignoring_positions(*args, position_ids=None, **kwargs):  # an attention that ignores record starts
        return original(*args, **kwargs)

    model.forward = ignoring_positions
    with pytest.raises(DaptError, match="lets a packed record attend to the record before it"):
        check_packed_records(model, 211, torch.device("cpu"))


def test_chat_records_train_on_the_assistant_turns(tmp_path, tokenizer_dir):
    from dapt.data_mix.records import ChatRenderer

    chat = ChatRenderer(tokenizer_dir)
    record = chat.record([{"role": "user", "content": "Headline: ACME rose"}, {"role": "assistant", "content": "up"},
                          {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "down"}])
    assert [(text, trained) for text, trained in record.segments] == [
        ("<|user|>Headline: ACME rose<|end|>\n<|assistant|>", False), ("up<|end|>\n", True),
        ("<|user|>And now?<|end|>\n<|assistant|>", False), ("down<|end|>\n", True)]
    assert chat.record([{"role": "user", "content": "hi"}]) == "no_assistant_turn"
    assert chat.record([{"role": "user"}]) == "malformed_record"

    plain = tmp_path / "plain"
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DaptError, match="has no chat template.*write the records as `prompt_completion`"):
        ChatRenderer(plain)


def headline_records(folder: Path) -> Path:
    """The demo's headline sentiment items as prompt/completion records."""
    items = [json.loads(line) for line in (Path(__file__).parents[2] / "configs" / "tasks" /
                                           "headline_sentiment.jsonl").read_text().splitlines()]
    path = folder / "headlines.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Headline: {item['text']}\nSentiment:",
                                        "completion": f" {item['label']}"}) + "\n" for item in items))
    return path


def test_records_from_labelled_rows_and_their_held_out_split_as_a_task(tmp_path, tokenizer_dir):
    """Labelled rows become records through the templates; `dapt eval --records` scores exactly the
    records the store holds out, each completion a label, shots only from the training records."""
    from dapt.experiment import load_experiment
    from dapt.launch.pipeline import build_stores
    from dapt.pretrain.tasks import record_task
    from tests.conftest import write_experiment

    rows = tmp_path / "labelled.jsonl"
    rows.write_text("".join(json.dumps({"text": f"shares of company {i} {'rose' if i % 3 else 'fell'}",
                                        "label": "positive" if i % 3 else "negative"}) + "\n" for i in range(40)))
    corpus = {"name": "sentiment", "paths": [str(rows)], "record_format": "prompt_completion",
              "prompt_template": "Headline: {text}\nSentiment:", "completion_template": " {label}", "max_tokens": 60}
    path = write_experiment(tmp_path, {"workdir": str(tmp_path / "run"), "corpora": [corpus],
                                       "heldout": {"fraction": 0.3, "max_documents": 100},
                                       "tokenizer": {"path": str(tokenizer_dir)}, "mix": {"seq_len": 64},
                                       "model": {"config": {"model_type": "llama"}}})
    experiment, _ = load_experiment(path)
    [manifest] = build_stores(experiment)
    task, train, test = record_task(experiment, "sentiment", shots=None)
    assert len(test) == manifest["splits"]["heldout"]["documents"] and len(train) + len(test) == 40
    assert task.label_words == {" negative": " negative", " positive": " positive"} and task.shots == 0
    assert all(e["text"].startswith("Headline: shares") and e["text"].endswith("Sentiment:") for e in test)
    store = TokenStore(tmp_path / "run" / "stores" / "sentiment", "heldout")
    from dapt.data_mix.build import load_encoder

    encoder, _ = load_encoder(tokenizer_dir)
    starts = np.concatenate([[0], store.doc_ends[:-1]])
    stored = sorted(encoder.decode(np.asarray(store.tokens[s:e])[~np.asarray(store.trained[s:e]).astype(bool)].tolist())
                    for s, e in zip(starts, store.doc_ends))
    assert stored == sorted(e["text"] for e in test)
    with pytest.raises(DaptError, match=r"--records web: not a corpus of `record_format: prompt_completion`"):
        record_task(experiment, "web", shots=None)


def test_a_store_of_chat_records_trains_on_the_assistant_turns(tmp_path, tokenizer_dir):
    from dapt.data_mix.build import load_encoder

    chats = [{"messages": [{"role": "user", "content": f"Headline: ACME {i} rose"},
                           {"role": "assistant", "content": "positive"},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]}
             for i in range(20)] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    corpus = CorpusConfig(name="chat", paths=[str(path)], record_format="messages", max_tokens=200)
    manifest = build_store(corpus, HeldoutConfig(fraction=0.1), tokenizer_dir, tmp_path / "stores")
    assert manifest["accounting"]["rejected"] == {"no_assistant_turn": 1}
    store = TokenStore(tmp_path / "stores" / "chat", "train")
    encoder, eos = load_encoder(tokenizer_dir)
    end = int(store.doc_ends[0])
    tokens, trained = np.asarray(store.tokens[:end]), np.asarray(store.trained[:end]).astype(bool)
    assert encoder.decode(tokens[trained][:-1].tolist(), skip_special_tokens=False) == "positive<|end|>\nyes<|end|>\n"
    assert tokens[-1] == eos and trained[-1]
