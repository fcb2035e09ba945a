import argparse
import json

import torch
from fmboost.benchmarks import train as bench_train


class CountingDataset(torch.utils.data.Dataset):
    """Counts item reads, so a test can tell a loader that streams the data from one that reuses a batch."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        return self.dataset[index]

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)


def test_bench_train_reports_three_modes_side_by_side(tmp_path, image_dir, capsys, monkeypatch):
    reads = []

    def counting_time_steps(dataset, *args, time_steps=bench_train.time_steps, **kwargs):
        counted = CountingDataset(dataset)
        result = time_steps(counted, *args, **kwargs)
        reads.append((kwargs.get("synthetic", False), counted.reads))
        return result

    monkeypatch.setattr(bench_train, "time_steps", counting_time_steps)
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--steps", "2", "-o", str(out), "--train-data-dir", str(image_dir),
                              "--dataset-name", "null", "--resolution", "16", "--crop-size", "16",
                              "--train-batch-size", "2", "--crops-per-image", "2", "--num-validation-images", "1",
                              "--block-out-channels", "[16, 32]", "--attention-levels", "[false, false]",
                              "--latent-stats-images", "4"])
    assert bench_train.run(args) == 0
    result = json.loads(out.read_text())
    for mode in ("without_cache", "with_cache", "synthetic_input"):
        assert result[mode]["samples_per_second"] > 0 and result[mode]["steps"] == 2
        assert result[mode]["peak_memory_mb"] > 0
    with_cache, without = result["with_cache"], result["without_cache"]
    assert result["speedup"] == with_cache["samples_per_second"] / without["samples_per_second"]
    assert result["cached_over_synthetic"] == (with_cache["samples_per_second"]
                                               / result["synthetic_input"]["samples_per_second"])
    assert result["latent_shape"] == [3, 16, 16] and result["cache_samples"] == 10
    assert result["dataloader_num_workers"] == 0
    # 3 steps (1 untimed + 2) of batch 2: the loaders read ≥ 6 items; the synthetic input takes one batch (its
    # accelerate loader reads one batch ahead, so 4 items) and reuses it
    assert [synthetic for synthetic, _ in reads] == [False, False, True]
    assert all(count >= 6 for _, count in reads[:2]) and reads[2][1] <= 4
    assert "synthetic input" in capsys.readouterr().err
