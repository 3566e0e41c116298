import pytest

from dapt.base import DaptError
from dapt.experiment import load_experiment
from tests.conftest import DEMO_CONFIG, shipped_config, write_experiment


def test_demo_config_validates_into_typed_sections(tmp_path):
    config = shipped_config(tmp_path)
    experiment, text = load_experiment(config)
    assert experiment.train.steps > 0 and experiment.mix.seq_len == 128
    assert [c.group for c in experiment.corpora] == ["financial", "financial", "public", "public"]
    assert experiment.corpora[0].paths[0].startswith(str(tmp_path)), "paths are relative to the file"
    assert "finance-demo" in text


def test_misspelt_key_names_path_line_and_suggestion(tmp_path):
    path = write_experiment(tmp_path, text="""\
        name: x
        corpora: [{name: a, paths: [a.txt]}]
        tokenizer: {path: tok}
        model: {config: {model_type: llama}}
        train:
          steps: 10
          global_batch_size: 4
          micro_batch_sise: 2
          lr: 0.001
        """)
    with pytest.raises(DaptError, match=r"experiment.yaml:8: train.micro_batch_sise: unknown key; did you mean `micro_batch_size`\?"):
        load_experiment(path)


def test_wrong_value_names_field_and_what_is_allowed(tmp_path):
    path = write_experiment(tmp_path, {"train": {"steps": -3, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3}})
    with pytest.raises(DaptError, match=r"train.steps: Input should be greater than 0 \(got -3\)"):
        load_experiment(path)


def test_literal_lists_the_choices(tmp_path):
    path = write_experiment(tmp_path, {"wandb": {"mode": "on"}})
    with pytest.raises(DaptError, match=r"wandb.mode: Input should be 'offline', 'online' or 'disabled'"):
        load_experiment(path)


def test_weight_for_unknown_corpus_is_refused(tmp_path):
    path = write_experiment(tmp_path, {"mix": {"seq_len": 64, "weights": {"filings": 1.0, "nws": 2.0}}})
    with pytest.raises(DaptError, match=r"mix.weights.nws: unknown corpus 'nws'; known: filings, news"):
        load_experiment(path)


def test_extend_names_its_domain_when_the_corpora_form_groups(tmp_path):
    model = {"path": "base", "embeddings": "extend"}
    with pytest.raises(DaptError, match=r"experiment.yaml:\d+: model.extend_domain: required with `embeddings: extend` "
                                        r"when the corpora form more than one group \(financial, public\)"):
        load_experiment(write_experiment(tmp_path, {"model": model}))
    with pytest.raises(DaptError, match=r"model.extend_domain\[0\]: unknown group or corpus 'finance'"):
        load_experiment(write_experiment(tmp_path, {"model": model | {"extend_domain": ["finance"]}}))
    experiment, _ = load_experiment(write_experiment(tmp_path, {"model": model | {"extend_domain": ["financial", "web"]}}))
    assert [c.name for c in experiment.extend_domain_corpora()] == ["filings", "news", "web"]


def test_negative_weight_is_refused(tmp_path):
    path = write_experiment(tmp_path, {"mix": {"weights": {"filings": -1.0}}})
    with pytest.raises(DaptError, match=r"mix: weights.filings: must be >= 0, got -1.0"):
        load_experiment(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write_experiment(tmp_path, text="name: x\ncorpora: [{name: a\ntrain: {}\n")
    with pytest.raises(DaptError, match=r"experiment.yaml:3: YAML syntax error"):
        load_experiment(path)


def test_missing_section_is_named(tmp_path):
    path = write_experiment(tmp_path, text="name: x\ncorpora: [{name: a, paths: [a]}]\ntokenizer: {path: t}\nmodel: {path: m}\n")
    with pytest.raises(DaptError, match=r"train: required field is missing"):
        load_experiment(path)


def test_tokenizer_needs_exactly_one_source(tmp_path):
    path = write_experiment(tmp_path, {"tokenizer": {"path": "tok", "train": {"vocab_size": 1000}}})
    with pytest.raises(DaptError, match=r"tokenizer: give exactly one of `path`"):
        load_experiment(path)


def test_duplicate_corpus_names_are_refused(tmp_path):
    corpora = [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]
    path = write_experiment(tmp_path, {"corpora": corpora, "mix": {"seq_len": 64}})
    with pytest.raises(DaptError, match=r"name 'a' is used twice"):
        load_experiment(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DaptError, match=r"nothere.yaml does not exist"):
        load_experiment(tmp_path / "nothere.yaml")


def test_stage_errors_name_the_stage(tmp_path):
    train = {"steps": 100, "global_batch_size": 16, "micro_batch_size": 4, "lr": 1e-3}
    path = write_experiment(tmp_path, {"train": train, "mix": {"stages": [{"start_step": 50, "weights": {"filngs": 1}}]}})
    with pytest.raises(DaptError, match=r"mix.stages\[0\].weights.filngs: unknown corpus 'filngs'"):
        load_experiment(path)
    path = write_experiment(tmp_path, {"train": train, "mix": {"stages": [{"start_step": 100, "weights": {"web": 1}}]}})
    with pytest.raises(DaptError, match=r"mix.stages\[0\].start_step: 100 is not before the last step \(100\)"):
        load_experiment(path)
    path = write_experiment(tmp_path, {"train": train, "mix": {"stages": [{"start_step": 9, "weights": {"web": 0}}]}})
    with pytest.raises(DaptError, match=r"weights: all weights are zero"):
        load_experiment(path)


def test_a_decays_weights_need_warmup_stable_decay_and_come_after_every_stage(tmp_path):
    train = {"steps": 100, "global_batch_size": 16, "micro_batch_size": 4, "lr": 1e-3}
    decay = {"weights": {"filings": 1}}
    path = write_experiment(tmp_path, {"train": train, "mix": {"decay": decay}})
    with pytest.raises(DaptError, match=r"experiment.yaml:\d+: mix.decay: the weights of a learning-rate decay phase "
                                        r"need `train.schedule: wsd` \(the schedule is cosine\)"):
        load_experiment(path)
    wsd = {**train, "schedule": "wsd", "decay_steps": 30}
    path = write_experiment(tmp_path, {"train": wsd, "mix": {"decay": {"weights": {"filngs": 1}}}})
    with pytest.raises(DaptError, match=r"mix.decay.weights.filngs: unknown corpus 'filngs'"):
        load_experiment(path)
    path = write_experiment(tmp_path, {"train": wsd, "mix": {"decay": decay, "stages": [{"start_step": 70, "weights": {"web": 1}}]}})
    with pytest.raises(DaptError, match=r"mix.stages\[0\].start_step: 70 is not before the decay, which starts after step 70"):
        load_experiment(path)
    path = write_experiment(tmp_path, {"train": wsd, "mix": {"decay": decay, "stages": [{"start_step": 69, "weights": {"web": 1}}]}})
    assert load_experiment(path)[0].train.decay_start == 70


def test_readme_experiment_file_is_valid(tmp_path):
    readme = (DEMO_CONFIG.parents[1] / "README.md").read_text()
    block = readme.split("## An experiment file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "readme.yaml").write_text(block)
    experiment, _ = load_experiment(tmp_path / "readme.yaml")
    assert experiment.mix.stages[0].start_step == 18000


def test_dapt_schema_describes_every_field(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "dapt.schema.json"
    result = subprocess.run([sys.executable, "-m", "dapt", "schema", "--output", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    schema = json.loads(out.read_text())
    assert "Peak learning rate" in schema["$defs"]["TrainConfig"]["properties"]["lr"]["description"]
    undocumented = [f"{name}.{field}" for name, model in [("Experiment", schema), *schema["$defs"].items()]
                    for field, spec in model.get("properties", {}).items() if not spec.get("description")]
    assert not undocumented, undocumented
