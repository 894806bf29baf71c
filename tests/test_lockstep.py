"""turnctl.lockstep.per_sample_pass in-process (a world of one): every sample exactly once, outputs
in idx order, the shards' labels and decodability gathered beside them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardgen import write_toy_shards
from turnctl.data import ToTensorResize, open_split
from turnctl.lockstep import _agree_on_schema, per_sample_pass


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockstep") / "toy"
    return write_toy_shards(root, counts={"train": [7, 5, 6]}, num_classes=3, noise_rate=0.3,
                            corrupt={"train": [4, 11]})


@pytest.mark.parametrize("batch_size,num_workers", [(4, 0), (5, 2)])
def test_every_sample_once_in_idx_order_with_labels(toy, batch_size, num_workers):
    info = open_split(toy.root, "train")
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))  # one number per image: what this image looked like

    out = per_sample_pass(forward, info, transform=ToTensorResize(8), batch_size=batch_size,
                          num_workers=num_workers, collect=lambda y, b: {"mean": y}, what="unit")
    n = info.num_samples
    assert out["idx"].tolist() == list(range(n))
    assert out["cls"].tolist() == toy.labels["train"]["cls"].tolist()
    assert out["clean"].tolist() == toy.labels["train"]["clean"].tolist()
    # Corrupt images are rows too (their forward saw zeros), marked not ok.
    assert sorted(np.flatnonzero(~out["ok"].astype(bool)).tolist()) == toy.corrupt["train"]
    assert out["mean"].shape == (n,) and np.isfinite(out["mean"]).all()
    good = out["ok"].astype(bool)
    assert (out["mean"][good] > 0).all()  # real pixels, not the padding zeros
    assert sum(seen) >= n and max(seen) <= batch_size


def test_same_outputs_whatever_the_batching(toy):
    info = open_split(toy.root, "train")
    runs = [per_sample_pass(lambda x: x.flatten(1)[:, :5], info, transform=ToTensorResize(8), batch_size=b,
                            num_workers=w, collect=lambda y, b_: {"v": y}) for b, w in ((3, 0), (16, 1))]
    np.testing.assert_array_equal(runs[0]["v"], runs[1]["v"])


def test_a_rank_with_no_sample_needs_another_ranks_schema():
    # A world of one in which this rank produced nothing: there is no schema to agree on.
    with pytest.raises(RuntimeError, match="no rank produced any sample"):
        _agree_on_schema(None)
    local = {"x": torch.zeros(2, 3)}
    assert _agree_on_schema(local) is local



def test_a_pass_with_more_rows_than_its_loader_promised_still_gathers_every_sample(monkeypatch):
    """The outputs go into buffers sized from the loader's step count; a shard holding more samples
    than sizes.json says must not overflow them (the coverage check then judges the idx)."""
    from types import SimpleNamespace

    import torch

    from turnctl import lockstep

    class TwoBatchesForOne:
        steps = 1  # what the sizes promised: one batch

        def __iter__(self):
            for start in (0, 2):
                idx = torch.tensor([start, start + 1])
                yield {"image": torch.arange(6.0).repeat(2, 1) + idx[:, None], "idx": idx, "cls": idx % 2,
                       "clean": idx % 2, "ok": torch.ones(2, dtype=torch.bool)}

    monkeypatch.setattr(lockstep, "exact_loader", lambda *a, **k: TwoBatchesForOne())
    out = lockstep.per_sample_pass(lambda x: x[:, :3], SimpleNamespace(num_samples=4, split="train"),
                                   transform=None, batch_size=2, num_workers=0, device=torch.device("cpu"),
                                   collect=lambda logits, b: {"score": logits.sum(1)})
    assert out["idx"].tolist() == [0, 1, 2, 3] and out["score"].tolist() == [3.0, 6.0, 9.0, 12.0]
    assert out["cls"].tolist() == [0, 1, 0, 1]
