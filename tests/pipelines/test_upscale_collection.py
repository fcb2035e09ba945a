"""`fmboost upscale` on collections: folders, globs, datasets and shards in one run, name-derived seeds equal to
the single-image command, atomic writes and resume after a kill, the failure report, and two processes
(torchrun, gloo) splitting the inputs without overlap or gap — all on a tiny ×2 pixel-space upsampler."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fmboost.pipelines import collection
from fmboost.pipelines.cli import main

SIZES = [(24, 16), (24, 16), (16, 16), (24, 16), (16, 16)]  # two sizes: batches form by size inside a chunk


def random_image(size, seed) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def photos(tmp_path):
    """A folder of five PNGs (two sizes), one in a subfolder."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        random_image(size, i).save(root / ("sub" if i == 4 else "") / f"p{i}.png")
    return root


def add_bad_inputs(root: Path) -> dict[str, str]:
    """An empty, a truncated, a text-named-.png and a too-large input; {name: kind}."""
    (root / "empty.png").write_bytes(b"")
    whole = io.BytesIO()
    random_image((24, 16), 9).save(whole, format="PNG")
    (root / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "notes.png").write_text("not an image\n")
    random_image((64, 64), 10).save(root / "huge.png")
    return {"empty.png": "empty", "truncated.png": "unreadable", "notes.png": "not-an-image", "huge.png": "too-large"}


def upscale(upsampler_dir, *argv) -> int:
    return main(["upscale", *map(str, argv), "--upsampler", str(upsampler_dir)])


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): pixels(p) for p in sorted(out.rglob("*.png"))
            if collection.STATE_DIR not in p.parts}


def test_image_seed_is_stable_and_name_dependent():
    assert collection.image_seed(0, "a.png") == collection.image_seed(0, "a.png")
    assert len({collection.image_seed(s, n) for s in (0, 1) for n in ("a.png", "b.png")}) == 4
    assert 0 <= collection.image_seed(7, "sub/x.jpg") < 2 ** 63
    assert collection.image_seed(0, "a.png") == 1084703708729653958  # fixed across processes and machines


def test_chunks_split_every_input_once_across_processes():
    for n, batch, processes in ((0, 4, 2), (10, 3, 1), (10, 3, 2), (17, 4, 3), (5, 8, 4)):
        shares = [collection.chunks_of(n, batch, p, processes) for p in range(processes)]
        flat = sorted(i for share in shares for chunk in share for i in chunk)
        assert flat == list(range(n))
        chunks = {tuple(c) for share in shares for c in share}
        assert chunks == {tuple(collection.chunks_of(n, batch, 0, 1)[k]) for k in range(len(chunks))}


def test_folder_mirrors_names_and_equals_the_single_image_command(upsampler_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert upscale(upsampler_dir, photos, "-o", out, "--batch-size", "1", "--seed", "3") == 0
    done = outputs(out)
    assert sorted(done) == ["p0.png", "p1.png", "p2.png", "p3.png", "sub/p4.png"]
    assert done["p0.png"].shape == (32, 48, 3) and done["p2.png"].shape == (32, 32, 3)
    assert "5 written, 0 skipped" in capsys.readouterr().out
    for name, image in done.items():  # the single-image command with the name's seed writes the same bytes
        single = tmp_path / "single.png"
        assert upscale(upsampler_dir, photos / name, "-o", single,
                       "--seed", collection.image_seed(3, name)) == 0
        np.testing.assert_array_equal(pixels(single), image)
    assert not np.array_equal(done["p0.png"], done["p1.png"])
    report = json.loads((out / collection.REPORT_NAME).read_text())
    assert report["written"] == 5 and report["failed"] == 0 and report["failures"] == []


def test_batches_agree_with_single_images_to_float_rounding(upsampler_dir, photos, tmp_path):
    assert upscale(upsampler_dir, photos, "-o", tmp_path / "one", "--batch-size", "1") == 0
    assert upscale(upsampler_dir, photos, "-o", tmp_path / "many", "--batch-size", "4") == 0
    one, many = outputs(tmp_path / "one"), outputs(tmp_path / "many")
    assert one.keys() == many.keys()
    for name in one:  # a batch rounds differently (≈ 1e-6), which may flip an 8-bit value by one
        assert np.abs(one[name].astype(int) - many[name].astype(int)).max() <= 1


def test_globs_files_and_output_beside_inputs(upsampler_dir, photos, tmp_path):
    out = photos / "x2"  # inside the input folder: a rerun must not read its own outputs
    assert upscale(upsampler_dir, photos, "-o", out) == 0
    assert upscale(upsampler_dir, photos, "-o", out) == 0
    assert sorted(outputs(out)) == ["p0.png", "p1.png", "p2.png", "p3.png", "sub/p4.png"]
    globbed = photos / "globbed"
    for _ in range(2):
        assert upscale(upsampler_dir, f"{photos}/**/p[24].png", photos / "p0.png", "-o", f"{globbed}/") == 0
        assert sorted(outputs(globbed)) == ["p0.png", "p2.png", "sub/p4.png", "x2/p2.png", "x2/sub/p4.png"]
    np.testing.assert_array_equal(outputs(globbed)["sub/p4.png"], outputs(out)["sub/p4.png"])


def test_dataset_and_webdataset_inputs(upsampler_dir, photos, tmp_path):
    import datasets

    files = sorted(photos.rglob("*.png"))
    dataset = datasets.Dataset.from_dict({"picture": [str(p) for p in files]}).cast_column("picture",
                                                                                           datasets.Image())
    dataset.save_to_disk(tmp_path / "dataset")
    assert upscale(upsampler_dir, tmp_path / "dataset", "-o", tmp_path / "from_dataset",
                   "--image-column", "picture") == 0
    assert sorted(outputs(tmp_path / "from_dataset")) == [f"{i:08d}.png" for i in range(len(files))]
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for i, path in enumerate(files):
            tar.add(path, arcname=f"sample{i}.png")
    assert upscale(upsampler_dir, shards, "-o", tmp_path / "from_shards") == 0
    from_shards = outputs(tmp_path / "from_shards")
    assert sorted(from_shards) == [f"sample{i}.png" for i in range(len(files))]
    assert from_shards["sample0.png"].shape == (32, 48, 3)


def test_bad_inputs_are_reported_and_the_run_goes_on(upsampler_dir, photos, tmp_path, capsys):
    bad = add_bad_inputs(photos)
    out = tmp_path / "out"
    argv = [photos, "-o", out, "--max-megapixels", "0.001", "--batch-size", "3"]
    assert upscale(upsampler_dir, *argv) == 1  # some failed
    printed = capsys.readouterr().out
    assert "5 written, 0 skipped (already there), 4 failed of 9 inputs" in printed
    report = json.loads((out / collection.REPORT_NAME).read_text())
    assert {f["input"]: f["kind"] for f in report["failures"]} == bad
    assert "0 bytes" in next(f["reason"] for f in report["failures"] if f["kind"] == "empty")
    assert "--max-megapixels" in next(f["reason"] for f in report["failures"] if f["kind"] == "too-large")
    assert sorted(outputs(out)) == ["p0.png", "p1.png", "p2.png", "p3.png", "sub/p4.png"]
    assert upscale(upsampler_dir, *argv) == 1  # a rerun writes nothing, lists each bad input once again
    report = json.loads((out / collection.REPORT_NAME).read_text())
    assert (report["written"], report["skipped"], report["failed"]) == (0, 5, 4)
    assert sorted(f["input"] for f in report["failures"]) == sorted(bad)
    for name in bad:
        (photos / name).unlink()
    random_image((24, 16), 11).save(photos / "notes.png")  # fixed: written by the next run
    assert upscale(upsampler_dir, *argv) == 0
    assert "notes.png" in outputs(out)


def test_user_errors(upsampler_dir, photos, tmp_path, capsys):
    def error(*argv):
        assert upscale(upsampler_dir, *argv) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "not found" in error(tmp_path / "missing", "-o", tmp_path / "out/")
    assert "matches no image" in error(f"{tmp_path}/*.jpg", "-o", tmp_path / "out")
    assert "occur twice" in error(photos / "p0.png", photos / "p0.png", "-o", tmp_path / "out")
    assert "--compare" in error(photos, "-o", tmp_path / "out", "--compare")
    assert "is the input folder" in error(photos, "-o", photos)
    assert "--ext 'xyz'" in error(photos, "-o", tmp_path / "out", "--ext", "xyz")
    assert upscale(upsampler_dir, photos, "-o", tmp_path / "out", "--seed", "1") == 0
    assert "other settings" in error(photos, "-o", tmp_path / "out", "--seed", "2")
    assert upscale(upsampler_dir, photos, "-o", tmp_path / "out", "--seed", "2", "--overwrite") == 0


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch):
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    target = tmp_path / "out" / "a.png"

    def fail_midway(self, fp, format=None, **params):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", fail_midway)
    with pytest.raises(OSError):
        collection.save_atomic(random_image((8, 8), 0), target, tmp_dir)
    assert not target.exists()  # the final name never shows a partial file
    monkeypatch.undo()
    collection.save_atomic(random_image((8, 8), 0), target, tmp_dir)
    assert PIL.Image.open(target).size == (8, 8) and list(tmp_dir.iterdir()) == []


# ---------------------------------------------------------------------- separate processes


def command(upsampler_dir, inputs, out, processes=1, *extra) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m"] if processes > 1 else [sys.executable, "-m"]
    return [*launcher, "fmboost.pipelines.cli", "upscale", str(inputs), "-o", str(out), "--upsampler",
            str(upsampler_dir), *extra]


def run_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def many(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(24):
        random_image((24, 16) if i % 3 else (16, 16), 100 + i).save(root / f"img{i:02d}.png")
    return root


def test_kill_mid_run_then_rerun_writes_the_rest_once(upsampler_dir, many, tmp_path):
    complete = tmp_path / "complete"
    subprocess.run(command(upsampler_dir, many, complete, 1, "--batch-size", "2"), env=run_env(), check=True,
                   capture_output=True)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(upsampler_dir, many, out, 1, "--batch-size", "2"), env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(outputs(out) if out.exists() else {}) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = outputs(out)  # every visible output is whole (PIL decodes it) and equal to the complete run's
    assert 4 <= len(partial) < 24
    for name, image in partial.items():
        np.testing.assert_array_equal(image, pixels(complete / name))
    times = {name: (out / name).stat().st_mtime_ns for name in partial}
    rerun = subprocess.run(command(upsampler_dir, many, out, 1, "--batch-size", "2"), env=run_env(), text=True,
                           capture_output=True, check=True)
    assert f"{24 - len(partial)} written, {len(partial)} skipped" in rerun.stdout
    assert all((out / name).stat().st_mtime_ns == t for name, t in times.items())  # nothing written twice
    assert outputs(out).keys() == outputs(complete).keys()
    for name, image in outputs(out).items():
        np.testing.assert_array_equal(image, pixels(complete / name))
    assert list((out / collection.STATE_DIR / "tmp").iterdir()) == []


def test_two_processes_split_the_inputs_and_match_one_process(upsampler_dir, many, tmp_path):
    add_bad_inputs(many)
    one, two = tmp_path / "one", tmp_path / "two"
    first = subprocess.run(command(upsampler_dir, many, one, 1, "--batch-size", "3", "--max-megapixels", "0.001"),
                           env=run_env(), text=True, capture_output=True)
    second = subprocess.run(command(upsampler_dir, many, two, 2, "--batch-size", "3", "--max-megapixels", "0.001"),
                            env=run_env(), text=True, capture_output=True)
    assert first.returncode == 1 and second.returncode == 1, second.stdout + second.stderr
    assert "24 written, 0 skipped (already there), 4 failed of 28 inputs" in second.stdout
    assert "on 2 process(es)" in second.stdout
    report = json.loads((two / collection.REPORT_NAME).read_text())
    assert report["processes"] == 2 and len(report["failures"]) == 4
    assert report["failures"] == json.loads((one / collection.REPORT_NAME).read_text())["failures"]
    first_images, second_images = outputs(one), outputs(two)
    assert first_images.keys() == second_images.keys() and len(second_images) == 24
    # The same batches and seeds: byte-identical files (MKL's results made independent of memory alignment).
    for name in first_images:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
