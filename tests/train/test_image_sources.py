"""Image folders, arrow / parquet datasets and webdataset shards open lazily and give the same images."""

import io
import tarfile
import time
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fmboost.train import image_sources
from fmboost.train.data import image_records, split_records
from PIL import Image

from .conftest import write_images


def _png(seed: int, size: int = 24) -> bytes:
    image = Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_rows(images: dict[str, bytes]) -> pa.Table:
    """The arrow layout of a `datasets` Image column: struct<bytes, path>."""
    return pa.table({"image": [{"bytes": data, "path": name} for name, data in images.items()]})


def write_parquet(folder, images: dict[str, bytes], row_group_size: int = 2):
    folder.mkdir(parents=True)
    pq.write_table(_image_rows(images), folder / "train-00000.parquet", row_group_size=row_group_size)
    return folder


def write_tar(folder, images: dict[str, bytes], per_shard: int = 4):
    folder.mkdir(parents=True)
    names = list(images)
    for shard, start in enumerate(range(0, len(names), per_shard)):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for name in names[start:start + per_shard]:
                key = name.rsplit(".", 1)[0]
                for member, data in ((name, images[name]), (f"{key}.txt", b"a caption")):  # webdataset: key.ext
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture
def images(image_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(image_dir.iterdir())}


@pytest.mark.parametrize("kind", ["folder", "save_to_disk", "arrow_files", "parquet", "tar", "parquet_file"])
def test_every_kind_gives_the_same_images(tmp_path, image_dir, images, tiny_config, kind):
    if kind == "folder":
        path = image_dir
    elif kind == "save_to_disk":  # what `load_dataset("imagefolder").save_to_disk(...)` writes
        path = tmp_path / "saved"
        datasets.Dataset(_image_rows(images)).cast_column("image", datasets.Image()).save_to_disk(str(path))
    elif kind == "arrow_files":  # the arrow files of a `datasets` cache
        path = tmp_path / "saved"
        datasets.Dataset(_image_rows(images)).save_to_disk(str(path))
        (path / "state.json").unlink()
    elif kind == "parquet":
        path = write_parquet(tmp_path / "parquet", images)
    elif kind == "parquet_file":
        path = write_parquet(tmp_path / "parquet", images) / "train-00000.parquet"
    else:
        path = write_tar(tmp_path / "tar", images)
    config = tiny_config(train_data_dir=None, dataset_name=str(path))
    source = image_records(config)
    assert len(source) == len(images) == 6
    assert [r.name for r in source] == list(images)
    for record in (source[5], source[0], source[3]):  # random access, across row groups and shards
        assert np.array_equal(np.asarray(record.open()), np.asarray(Image.open(io.BytesIO(images[record.name]))))
    train, validation = split_records(source, config)
    assert len(train) == 5 and [r.name for r in validation] == ["05.png"]
    assert [r.name for r in train[1:3]] == ["01.png", "02.png"]


def test_several_folders_and_bad_paths(tmp_path, image_dir, tiny_config):
    other = write_images(tmp_path / "other", count=3, seed=1)
    source = image_records(tiny_config(train_data_dir=[str(image_dir), str(other)]))
    assert len(source) == 9 and source[8].data == str(other / "02.png")
    with pytest.raises(FileNotFoundError, match="train_data_dir .*missing.* does not exist"):
        image_records(tiny_config(train_data_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images, nor .parquet / .arrow / .tar files"):
        image_records(tiny_config(train_data_dir=str(tmp_path / "empty")))
    path = write_parquet(tmp_path / "parquet", {"a.png": _png(0)})
    with pytest.raises(ValueError, match=r"image_column 'picture' not in the columns \['image'\]"):
        image_records(tiny_config(train_data_dir=str(path), image_column="picture"))


def _start_up(folder, tiny_config, monkeypatch) -> tuple[float, int, int]:
    """Seconds, traced bytes and images decoded to open a source and split it, as training starts."""
    opened = []
    original = image_sources.ImageRecord.open
    monkeypatch.setattr(image_sources.ImageRecord, "open", lambda self: opened.append(self.name) or original(self))
    config = tiny_config(train_data_dir=str(folder), resolution=8, crop_size=8)

    def start_up():
        train, validation = split_records(image_records(config), config)
        train[len(train) // 2].open()  # the first image a data loader would ask for

    start = time.perf_counter()
    start_up()
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second pass: tracing slows allocations, so it is not timed
    start_up()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, len(opened) // 2


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_start_up_stays_flat_as_the_dataset_grows(tmp_path, tiny_config, monkeypatch, kind):
    """2 k vs 20 k images: no image is decoded but the validation ones and the one asked for; what grows is the list
    of names (folder) or nothing (parquet footers): microseconds and ~100 bytes per image, not a decode or a read."""
    data = _png(0, size=8)
    measured = {}
    for n in (2_000, 20_000):
        names = {f"{i:06d}.png": data for i in range(n)}
        if kind == "folder":
            folder = tmp_path / str(n)
            folder.mkdir()
            for name in names:
                (folder / name).write_bytes(data)
        else:
            folder = write_parquet(tmp_path / str(n), names, row_group_size=500)
        _start_up(folder, tiny_config, monkeypatch)  # warm imports and the file system cache
        measured[n] = _start_up(folder, tiny_config, monkeypatch)
    (t_small, m_small, opened_small), (t_large, m_large, opened_large) = measured[2_000], measured[20_000]
    print(f"{kind}: start-up 2k {t_small * 1e3:.1f} ms / {m_small / 1e6:.2f} MB, 20k {t_large * 1e3:.1f} ms / "
          f"{m_large / 1e6:.2f} MB (ratios ×{t_large / t_small:.1f}, ×{m_large / m_small:.1f})")
    assert opened_small == opened_large == 2  # one validation image, one training image
    assert (m_large - m_small) / 18_000 < 300  # bytes per added image: a name, never its pixels or bytes
    assert t_large - t_small < 1.0  # < 56 µs per added image; decoding these 8×8 PNGs costs ≈ 70 µs, datasets'
    # imagefolder (which this replaces) takes seconds more to write its arrow copy
