"""The data path: read corpora, build token stores, blend them by weight, load batches."""
