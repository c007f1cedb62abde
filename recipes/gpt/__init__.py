"""A Llama-style decoder pretrained on the Python standard library's own source code.

The corpus ships with every Python interpreter, so the recipe trains on real text on a machine
with no network and no data set to download. Modules, in the order a run uses them:

- ``config``: the typed recipe configuration, YAML presets in ``configs/`` and ``--set`` overrides;
- ``data``: the corpus, its cached token stream, and a resumable, rank-sliced batch loader;
- ``tokenizer``: raw bytes, or a byte-level BPE trained locally and cached;
- ``model``: the decoder itself, sized from ~1M to ~1B parameters by configuration;
- ``train``: the training loop, single process or ``torchrun`` with DDP or FSDP2.

Run it with ``python -m recipes.gpt.train --config tiny``.
"""
