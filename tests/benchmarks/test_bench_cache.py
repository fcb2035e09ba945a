import argparse
import json

import pytest
from fmboost.benchmarks import cache as bench_cache


@pytest.mark.slow  # two torch.distributed.run launches (≈ 20 s)
def test_bench_cache_builds_with_two_processes_and_reads_in_little_memory(tmp_path, image_dir, capsys):
    parser = argparse.ArgumentParser()
    bench_cache.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--read-gb", "0.125", "--read-shape", "4,64,64", "--read-workers", "0",
                              "--psnr-patches", "4", "-o", str(out), "--train-data-dir", str(image_dir),
                              "--dataset-name", "null", "--resolution", "16", "--crop-size", "16",
                              "--train-batch-size", "2", "--crops-per-image", "2", "--num-validation-images", "1",
                              "--latent-stats-images", "4", "--latent-cache-shard-images", "1"])
    assert bench_cache.run(args) == 0
    result = json.loads(out.read_text())
    one, two = result["build"]["1"], result["build"]["2"]
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["samples"] == two["samples"] == 10 and two["shards_per_rank"] == [3, 2]  # 5 shards, every rank its share
    assert result["build_ratio_2_over_1"] == two["samples_per_second"] / one["samples_per_second"]
    read = result["read"]
    assert read["samples"] == read["cache_samples"] // 2 * 2 and read["cache_mb"] > 120
    assert read["peak_rss_mb"] - read["rss_before_mb"] < read["cache_mb"] / 8  # a cache concatenated in RAM: > 128
    assert result["dtype"]["psnr_db_vs_float32"]["float16"] > result["dtype"]["psnr_db_vs_float32"]["bfloat16"] > 40
    err = capsys.readouterr().err
    assert "build throughput 2 / 1 processes: ×" in err and "peak RSS" in err
