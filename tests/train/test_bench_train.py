import argparse
import json

from fmboost.train import bench_train


def test_bench_train_reports_both_modes_side_by_side(tmp_path, image_dir, capsys):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--steps", "2", "-o", str(out), "--train_data_dir", str(image_dir),
                              "--dataset_name", "null", "--resolution", "16", "--crop_size", "16",
                              "--train_batch_size", "2", "--crops_per_image", "2", "--num_validation_images", "1",
                              "--block_out_channels", "[16, 32]", "--attention_levels", "[false, false]",
                              "--latent_stats_images", "4"])
    assert bench_train.run(args) == 0
    result = json.loads(out.read_text())
    for mode in ("without_cache", "with_cache"):
        assert result[mode]["samples_per_second"] > 0 and result[mode]["steps"] == 2
        assert result[mode]["peak_memory_mb"] > 0
    with_cache, without = result["with_cache"], result["without_cache"]
    assert result["speedup"] == with_cache["samples_per_second"] / without["samples_per_second"]
    assert result["latent_shape"] == [3, 16, 16] and result["cache_samples"] == 10
    assert "samples/s" in capsys.readouterr().err
