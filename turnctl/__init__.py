"""turnctl: robust fine-tuning of pre-trained backbones under noisy labels (TURN).

The package follows the data flow, one module per step::

    prepare/   raw dataset -> WebDataset shards with recorded label noise
    shards     streaming reader over those shards (every rank the same number of steps)
    models/    pre-trained feature extractors behind one small interface
    features   frozen-feature pre-extraction on every rank, gathered to rank 0, cached
    probe      linear probe on rank 0 (CE / GCE / ELR)
    cleanse    per-class two-component GMM on per-sample losses -> balanced clean subset
    finetune   DeepSpeed ZeRO full fine-tuning on the clean subset
    evaluate   top-1 / per-class accuracy of a checkpoint
"""

__version__ = "0.1.0"
