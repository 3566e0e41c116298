"""LoRA settings that cannot work are refused before a process starts (training with LoRA is in
integration/test_lora_training.py)."""



from tests.conftest import write_experiment
from tests.helpers import assert_one_line_error, dapt


def test_lora_needs_a_pretrained_model(tmp_path, small_corpora):
    path = write_experiment(tmp_path, {"model": {"config": {"model_type": "llama", "hidden_size": 32}},
                                       "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-3,
                                                 "lora": {"r": 4}}})
    assert_one_line_error(dapt("mix", "plan", str(path)), "train.lora: adapters tune a pretrained model")
