"""dapt: domain-adaptive pretraining.

The project's folders install as one namespace: `dapt.data_mix`, `dapt.tokenizer`,
`dapt.pretrain` and `dapt.launch` (setup.cfg maps them), above this package, which holds
what all four use: the user-facing error and the strict config base (`dapt.base`) and the
figure helpers (`dapt.figures`).
"""

__version__ = "0.1.0"
