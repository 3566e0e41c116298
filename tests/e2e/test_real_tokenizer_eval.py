"""A domain tokenizer measured against a real base model's own (SmolLM2's), per corpus."""

import re


def test_a_domain_tokenizer_is_measured_against_the_base_models_own(tmp_path, small_corpora, smollm2):
    """The baseline users have: a base model's tokenizer beside the experiment's, per corpus, with a
    warning wherever the base's compresses better, in the tokenizer stage and in `dapt tokenizer eval`."""
    from tests.conftest import small_corpora_section, write_experiment
    from tests.helpers import dapt

    path = write_experiment(tmp_path, {
        "workdir": str(tmp_path), "corpora": small_corpora_section(small_corpora),
        "tokenizer": {"train": {"vocab_size": 600, "sample_bytes": 2e5}},
        "model": {"path": str(smollm2), "embeddings": "transplant"}})
    for command in ("train", "eval"):
        result = dapt("tokenizer", command, str(path))
        assert result.returncode == 0, result.stderr
        assert f"T1 = {smollm2} (the base model’s own)" in result.stdout and "tokens vs base" in result.stdout
        warned = set(re.findall(r"^warning: .* more tokens than the base model's tokenizer on `(\w+)`", result.stdout,
                                re.MULTILINE))
        assert warned == {"filings", "news", "encyclopedia", "web"}, result.stdout  # 600 pieces against 49,152
        assert f"warning: {tmp_path / 'tokenizer'} needs " in result.stdout
