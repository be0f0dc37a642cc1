"""The data pipeline, one module per stage (below): a text stream -> held-out split ->
on-the-fly tokenization -> seeded shuffle buffer -> packed blocks (or padded rows) -> a resumable DataLoader.

Sources are `datasets.IterableDataset`s read in streaming mode, from the hub
(`hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2`), local files (.jsonl/.json, .parquet, .txt,
folders and globs) or `builtin:python-docs`, a corpus built from the Python installation.

Every stage after the source keeps its state in plain Python values (the source's own
`state_dict()`, the shuffle buffer and its RNG, the packer's leftover tokens), so
`torchdata`'s StatefulDataLoader can snapshot it per worker and a restored loader yields
exactly the batches an uninterrupted one would.

    config.py    what `data:` in a config holds
    sources.py   documents from the hub, files or builtin:python-docs; the held-out split
    chat.py      conversations -> token ids and the mask of the assistant's tokens, for any template
    stream.py    tokens, shuffle buffer, packing or padding; one stream split between ranks
    shards.py    `smoltrain prepare`: token shards on disk
    shard_set.py reading them back by memory map, checked
    mixture.py   weighted mixtures and stages over shards and streams, by a seeded plan
    loader.py    the resumable DataLoader a run draws its micro-batches from
"""
