"""Carrying a base model over to a domain tokenizer: rows copied or averaged as planned, the
untied head too, extended tokenizers that round-trip, and held-out bits-per-byte at step 0."""

import copy
import json
import math
import re
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dapt.base import DaptError
from dapt.pretrain.config import ModelConfig
from dapt.pretrain.model import build_model, carried_over_model
from dapt.tokenizer.config import TokenizerTrainConfig
from dapt.tokenizer.evaluate import heldout_texts
from dapt.tokenizer.train import draw_sample, train_from_sample
from dapt.tokenizer.extend import extend_tokenizer
from dapt.tokenizer.transplant import carry_over, plan_rows
from tests.conftest import small_corpora_section, write_experiment
from tests.helpers import assert_one_line_error, base_cut_of, dapt_here

HIDDEN = 64


def tiny_llama(tokenizer, tied: bool, hidden: int = HIDDEN, layers: int = 2):
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                  tie_word_embeddings=tied, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config)


def train_base_model(model, tokenizer, lines: list[str], steps: int) -> None:
    """A stand-in for a pretrained base model: `steps` AdamW steps on random windows of `lines`."""
    ids = torch.tensor([i for line in lines for i in [*tokenizer(line, add_special_tokens=False)["input_ids"],
                                                      tokenizer.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def heldout_bpb(model, tokenizer, texts: list[str], window: int | None = None) -> float:
    """Bits per UTF-8 byte with every token predicted once (after BOS), so tokenizers compare fairly;
    a text longer than `window` tokens is read in consecutive windows."""
    nats = total_bytes = 0.0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
            step = window or len(ids)
            for start in range(0, len(ids) - 1, step):
                chunk = torch.tensor([ids[start:start + step + 1]], device=model.device)
                nats += model(chunk, labels=chunk).loss.float().item() * (chunk.shape[1] - 1)
            total_bytes += len(text.encode("utf-8"))
    return nats / math.log(2) / total_bytes


def draw_new_rows(model, rows: list[int], std: float, seed: int = 0) -> None:
    """The alternative to carrying over: `rows` of the embeddings and output head drawn from N(0, std²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            drawn = torch.randn(len(rows), weight.shape[1], generator=generator) * std
            weight[torch.tensor(rows)] = drawn.to(weight.device, weight.dtype)


@pytest.fixture(scope="module")
def base_and_domain(built_experiment, tmp_path_factory):
    """A general base tokenizer and model (public text with a little finance, as general corpora
    have) saved as a Hugging Face folder, and a domain tokenizer trained on the experiment's mix."""
    experiment = built_experiment
    folder = tmp_path_factory.mktemp("transplant")
    general = {c.name: 0.4 if c.group == "public" else 0.05 for c in experiment.corpora}
    general_lines = draw_sample(experiment.corpora, general, experiment.heldout, 4.0e5)
    domain_lines = draw_sample(experiment.corpora, {c.name: 0.25 for c in experiment.corpora}, experiment.heldout, 4.0e5)
    train_from_sample(general_lines, TokenizerTrainConfig(vocab_size=800), folder / "base")
    domain_dir = train_from_sample(domain_lines, TokenizerTrainConfig(vocab_size=800), folder / "domain")
    base_tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    torch.manual_seed(0)
    model = tiny_llama(base_tokenizer, tied=False)
    train_base_model(model, base_tokenizer, general_lines, steps=150)  # embeddings that mean something (loss ~7 → ~1)
    model.save_pretrained(folder / "base")
    financial = [t for c in experiment.corpora if c.group == "financial" for t in heldout_texts(c, experiment.heldout)[:15]]
    return folder / "base", domain_dir, domain_lines, financial


def test_same_vocabulary_is_an_exact_copy(base_and_domain):
    base_dir, _, _, texts = base_and_domain
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    carried = copy.deepcopy(model)
    plan = carry_over(carried, tokenizer, tokenizer)
    assert plan.averaged == [] and len(plan.copied) == len(tokenizer)
    assert torch.equal(carried.lm_head.weight, model.lm_head.weight)
    assert heldout_bpb(carried, tokenizer, texts[:3]) == pytest.approx(heldout_bpb(model, tokenizer, texts[:3]))


def test_transplant_is_closer_to_the_base_model_than_random_rows(base_and_domain):
    base_dir, domain_dir, _, texts = base_and_domain
    base_tokenizer, domain = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(domain_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = heldout_bpb(model, base_tokenizer, texts)
    carried = copy.deepcopy(model)
    plan = carry_over(carried, base_tokenizer, domain)
    assert len(plan.copied) > len(plan.averaged) > 0
    transplanted = heldout_bpb(carried, domain, texts)
    draw_new_rows(carried, plan.averaged, model.config.initializer_range)  # as the model's initializer draws them
    random_rows = heldout_bpb(carried, domain, texts)
    print(f"held-out financial BPB at step 0: base {base:.3f}, transplant {transplanted:.3f}, random new rows {random_rows:.3f}")
    assert abs(transplanted - base) < 0.95 * abs(random_rows - base)


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_means_of_their_pieces_in_both_matrices(base_and_domain, tied):
    base_dir, domain_dir, _, _ = base_and_domain
    base_tokenizer, domain = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(domain_dir)
    model = tiny_llama(base_tokenizer, tied)
    carried = copy.deepcopy(model)
    plan = carry_over(carried, base_tokenizer, domain)
    _, sources = plan_rows(base_tokenizer, domain)
    assert carried.get_input_embeddings().num_embeddings == len(domain) == carried.config.vocab_size
    assert (carried.lm_head.weight is carried.model.embed_tokens.weight) == tied
    for index in [plan.copied[300], plan.averaged[0], plan.averaged[-1]]:
        for new, old in ((carried.model.embed_tokens, model.model.embed_tokens), (carried.lm_head, model.lm_head)):
            assert torch.allclose(new.weight[index], old.weight[sources[index]].mean(0), atol=1e-6)
    piece = domain.convert_ids_to_tokens(plan.copied[300])
    assert base_tokenizer.convert_ids_to_tokens(sources[plan.copied[300]][0]) == piece


def test_extended_tokenizer_keeps_base_ids_and_round_trips(base_and_domain, tmp_path):
    base_dir, domain_dir, lines, texts = base_and_domain
    added = extend_tokenizer(base_dir, lines, 30, tmp_path / "extended", domain_dir)
    base, extended = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(tmp_path / "extended")
    assert len(added) == 30 and len(extended) == len(base) + 30
    assert all(extended.convert_tokens_to_ids(piece) == index for piece, index in base.get_vocab().items())
    for text in texts:
        assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text
    assert sum(map(len, (extended.tokenize(t) for t in texts))) < sum(map(len, (base.tokenize(t) for t in texts)))


def cuts(tokenizer, word: str) -> set[int]:
    """Where the tokenizer cuts `word` (character offsets)."""
    offsets = tokenizer(word, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return {end for _, end in offsets}


def test_extending_a_byte_level_bpe_only_merges_what_the_base_cut(base_and_domain, built_experiment, tmp_path):
    """New merges come after the base's: every word is cut where the base cuts it, or at fewer of those places."""
    _, _, lines, texts = base_and_domain
    byte_level = train_from_sample(lines, TokenizerTrainConfig(backend="huggingface", model="byte_level", vocab_size=500),
                                   tmp_path / "byte_level")
    financial = [line for line in lines if "Shares" in line or "revenue" in line.lower()]
    added = extend_tokenizer(byte_level, financial, 40, tmp_path / "extended")
    base, extended = AutoTokenizer.from_pretrained(byte_level), AutoTokenizer.from_pretrained(tmp_path / "extended")
    assert len(added) == 40 and len(extended) == len(base) + 40 and not extended.get_added_vocab().keys() - base.get_added_vocab().keys()
    assert all(extended.convert_tokens_to_ids(piece) == index for piece, index in base.get_vocab().items())
    assert not any(character.isdigit() for piece in added for character in piece), "digits stay apart, as in the base"
    public = [t for c in built_experiment.corpora if c.group == "public" for t in heldout_texts(c, built_experiment.heldout)]
    words = {word for text in texts + public for word in re.findall(r" ?\w+", text)}
    for word in words:
        assert cuts(extended, word) <= cuts(base, word), word
    for text in texts + public:
        assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text
    assert sum(map(len, (extended.tokenize(t) for t in texts))) < sum(map(len, (base.tokenize(t) for t in texts)))


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre_tokenizer", ["gpt2", "llama3"])
def test_extending_a_byte_level_bpe_by_runs_of_words(base_and_domain, built_experiment, tmp_path, pre_tokenizer):
    """`extend_phrase_words`: pieces may span words (` net sales`) where the domain repeats them, on
    GPT-2's pre-tokenizer and Llama 3's; every text is still cut where the base cuts it, or at fewer
    of those places, and round-trips; a base that cannot keep runs of words whole is refused."""
    base_dir, domain_dir, lines, texts = base_and_domain
    byte_level = train_from_sample(lines, TokenizerTrainConfig(backend="huggingface", model="byte_level", vocab_size=500),
                                   tmp_path / "byte_level")
    if pre_tokenizer == "llama3":
        state = json.loads((byte_level / "tokenizer.json").read_text())
        state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        (byte_level / "tokenizer.json").write_text(json.dumps(state))
    financial = [line for line in lines if "Shares" in line or "revenue" in line.lower()]
    added = extend_tokenizer(byte_level, financial, 40, tmp_path / "extended", phrase_words=4)
    base, extended = AutoTokenizer.from_pretrained(byte_level), AutoTokenizer.from_pretrained(tmp_path / "extended")
    spanning = [piece for piece in added if " " in piece[1:]]
    assert spanning and all(re.fullmatch(r"( \w+)+", piece) for piece in spanning), spanning
    assert not any(character.isdigit() for piece in added for character in piece)
    public = [t for c in built_experiment.corpora if c.group == "public" for t in heldout_texts(c, built_experiment.heldout)]
    for text in texts + public:
        assert base_cut_of(base, extended, text) == base(text, add_special_tokens=False)["input_ids"], text
        assert extended.decode(extended(text, add_special_tokens=False)["input_ids"]) == text
    assert sum(map(len, (extended.tokenize(t) for t in texts))) < sum(map(len, (base.tokenize(t) for t in texts)))
    with pytest.raises(DaptError, match=r"model.extend_phrase_words: 4 needs a byte-level BPE base .* set `extend_phrase_words: 1`"):
        extend_tokenizer(base_dir, lines, 30, tmp_path / "unigram", domain_dir, phrase_words=4)


def test_model_and_tokenizer_mismatches_are_named(base_and_domain, tmp_path):
    base_dir, domain_dir, _, _ = base_and_domain
    domain = AutoTokenizer.from_pretrained(domain_dir)
    with pytest.raises(DaptError, match=r"another tokenizer than the experiment's; set `model.embeddings: transplant`"):
        build_model(ModelConfig(path=str(base_dir)), domain, seed=0, activation_checkpointing=False)
    small = tiny_llama(domain, tied=True)
    small.resize_token_embeddings(100)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(DaptError, match=r"has 100 embedding rows but its tokenizer has 800 pieces; set `model.base_tokenizer`"):
        carried_over_model(ModelConfig(path=str(tmp_path / "small"), embeddings="transplant", base_tokenizer=str(domain_dir)),
                           domain)
    with pytest.raises(ValueError, match="embeddings: transplant carries a base model over; it needs `path`"):
        ModelConfig(config={"model_type": "llama"}, embeddings="transplant")


def test_bad_tokenizer_input_through_the_command(tmp_path, small_corpora):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    path = write_experiment(tmp_path, {"tokenizer": {"path": "broken"}})
    assert_one_line_error(dapt_here("tokenizer", "train", str(path)), "broken is not a tokenizer directory AutoTokenizer can load")
    path = write_experiment(tmp_path, {"corpora": [{"name": "filings", "paths": [str(small_corpora / "data/filings/*.jsonl")]}],
                                       "mix": {"seq_len": 64}, "model": {"path": "broken", "embeddings": "extend"}})
    assert_one_line_error(dapt_here("tokenizer", "train", str(path)), "broken is not a tokenizer directory AutoTokenizer can load")
    # One document, held out (its hash is below the fraction): nothing is left to train on.
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "Revenue rose 3 percent."}) + "\n")
    path = write_experiment(tmp_path, {"corpora": [{"name": "filings", "paths": ["one.jsonl"]}], "mix": {"seq_len": 64},
                                       "heldout": {"fraction": 0.5}})
    assert_one_line_error(dapt_here("tokenizer", "train", str(path)),
                          "the training sample is empty: 1 document(s) read from the corpora with a mix share, 1 of them held out")


def test_extend_through_the_tokenizer_stage_and_build_model(base_and_domain, small_corpora, tmp_path):
    from dapt.experiment import load_experiment
    from dapt.launch.pipeline import train_tokenizer

    base_dir, _, _, _ = base_and_domain
    model = {"path": str(base_dir), "embeddings": "extend", "extend_pieces": 3, "extend_domain": ["financial"]}
    path = write_experiment(tmp_path, {"corpora": small_corpora_section(small_corpora),
                                       "tokenizer": {"train": {"vocab_size": 600, "sample_bytes": 2.0e5}}, "model": model})
    experiment, _ = load_experiment(path)
    assert train_tokenizer(experiment) == experiment.tokenizer_dir == tmp_path / "tokenizer-extended"
    tokenizer = AutoTokenizer.from_pretrained(experiment.tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = carried_over_model(experiment.model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == len(AutoTokenizer.from_pretrained(base_dir)) + 3
    assert torch.equal(model.get_input_embeddings().weight[:800], base.get_input_embeddings().weight)


def test_fitted_new_rows_start_closer_to_the_base_than_their_means(base_and_domain, built_experiment, tmp_path):
    """`model.fit_new_rows`: the new rows alone learn on windows of the training stores; every other
    weight stays the base's, and the step-0 held-out BPB falls below that of the mean rows."""
    from dapt.data_mix.store import experiment_stores
    from dapt.pretrain.model import CARRY_OVER_STAMP, write_carried_over
    from dapt.pretrain.new_rows import FIT_BATCH, fit_windows

    base_dir, domain_dir, lines, texts = base_and_domain
    stores = list(experiment_stores(built_experiment, "train").values())
    drawn = fit_windows(stores, seq_len=64, steps=40, seed=0)
    assert drawn.shape == (40 * FIT_BATCH, 65) and torch.equal(drawn, fit_windows(stores, 64, 40, 0))
    assert not torch.equal(drawn, fit_windows(stores, 64, 40, 1))
    # The domain tokenizer's windows of the domain sample, as fit_windows cuts them from its stores.
    tokenizer = AutoTokenizer.from_pretrained(domain_dir)
    ids = torch.tensor([i for line in lines for i in tokenizer(line, add_special_tokens=False)["input_ids"]])
    windows = torch.stack([ids[s:s + 65] for s in torch.randint(0, len(ids) - 65, (40 * FIT_BATCH,),
                                                                 generator=torch.Generator().manual_seed(0))])
    config = ModelConfig(path=str(base_dir), embeddings="transplant", fit_new_rows=40)
    means, fitted = carried_over_model(config, tokenizer), carried_over_model(config, tokenizer, windows)
    new = plan_rows(AutoTokenizer.from_pretrained(base_dir), tokenizer)[0].averaged
    kept = torch.ones(len(tokenizer), dtype=torch.bool)
    kept[new] = False
    for (name, mean_weight), (_, fitted_weight) in zip(means.state_dict().items(), fitted.state_dict().items()):
        rows_kept = kept if mean_weight.shape[:1] == (len(tokenizer),) else slice(None)
        assert torch.equal(mean_weight[rows_kept], fitted_weight[rows_kept]), name
    assert not torch.equal(means.get_input_embeddings().weight[new], fitted.get_input_embeddings().weight[new])
    assert all(p.requires_grad for p in fitted.parameters()), "nothing stays frozen after the fit"
    assert heldout_bpb(fitted, tokenizer, texts) < heldout_bpb(means, tokenizer, texts) - 0.05
    write_carried_over(config, domain_dir, tmp_path / "carried-over", windows)
    assert "fit_windows" in json.loads((tmp_path / "carried-over" / CARRY_OVER_STAMP).read_text())


def test_the_carried_over_folder_is_written_once_and_rewritten_when_an_input_changes(base_and_domain, tmp_path, capsys):
    from dapt.data_mix.store import tokenizer_hash
    from dapt.pretrain.model import CARRY_OVER_STAMP, write_carried_over

    base_dir, domain_dir, _, _ = base_and_domain
    config = ModelConfig(path=str(base_dir), embeddings="transplant")
    out = tmp_path / "carried-over"
    write_carried_over(config, domain_dir, out)
    carried = AutoModelForCausalLM.from_pretrained(out)
    assert carried.get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(out))
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(domain_dir).get_vocab()
    written = (out / "model.safetensors").stat().st_mtime_ns
    write_carried_over(config, domain_dir, out)
    assert "carried-over base model up to date" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    other = tmp_path / "other-domain"
    shutil.copytree(domain_dir, other)
    vocabulary = json.loads((other / "tokenizer.json").read_text())
    vocabulary["added_tokens"].append({**vocabulary["added_tokens"][-1], "id": len(AutoTokenizer.from_pretrained(domain_dir)),
                                       "content": "<ticker>"})
    (other / "tokenizer.json").write_text(json.dumps(vocabulary))
    write_carried_over(config, other, out)
    assert "carried over (transplant)" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().num_embeddings == len(AutoTokenizer.from_pretrained(other))
    assert json.loads((out / CARRY_OVER_STAMP).read_text())["tokenizer"] == tokenizer_hash(other)
    assert not out.with_name(out.name + ".tmp").exists()
