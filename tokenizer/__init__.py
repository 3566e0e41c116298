"""Domain tokenizers: train one on the experiment's corpora and save it for Hugging Face."""
