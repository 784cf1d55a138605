"""Reading outputs back: ManifestDataset in a torch DataLoader with worker processes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import daskmv
from daskmv.data import ManifestDataset, load_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(dataset, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "out"
    daskmv.run(str(dataset / "manifest.csv"), [{"resize": {"size": 32}}, "stats"], str(out), client=client,
               progress="none")
    return out / "manifest.parquet"


def test_dataset_items_and_error_rows_skipped(small_run):
    ds = ManifestDataset(str(small_run), columns=["resized", "mean_r", "label"])
    frame = pd.read_parquet(small_run)
    ok = frame[frame["status"] == "ok"].reset_index(drop=True)
    assert len(ds) == len(ok) == 300
    item = ds[7]
    assert item["id"] == ok["id"][7]
    assert item["resized"].shape == (32, 32, 3) and item["resized"].dtype == np.uint8
    assert (item["resized"] == load_output(str(small_run), item["id"], "resized")).all()
    assert item["mean_r"] == pytest.approx(ok["mean_r"][7]) and item["label"] == ok["label"][7]
    everything = ManifestDataset(str(small_run), columns=["resized"], include_errors=True)
    assert len(everything) == 304
    errors = [everything[i] for i in range(304) if everything.frame["id"][i] not in set(ok["id"])]
    assert len(errors) == 4 and all(e["resized"] is None for e in errors)
    with pytest.raises(KeyError, match="no column or array output 'nope'"):
        ManifestDataset(str(small_run), columns=["nope"])


def test_dataloader_with_two_worker_processes(small_run):
    ds = ManifestDataset(str(small_run), columns=["resized", "sharpness"])
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    seen = []
    for batch in loader:
        assert batch["resized"].dtype == torch.uint8 and batch["resized"].shape[1:] == (32, 32, 3)
        assert batch["sharpness"].dtype == torch.float64
        seen += list(batch["id"])
        first = load_output(str(small_run), batch["id"][0], "resized")
        assert (batch["resized"][0].numpy() == first).all()
    assert seen == ds.frame["id"].tolist()
