"""Indexed, lazy image sources: an image folder, a local Hugging Face dataset (arrow / parquet), webdataset shards.

FFHQ / LHQ hold 10⁵ images; opening them must not decode, read or convert every image (what
`datasets.load_dataset("imagefolder")` does: it writes an arrow copy of the whole folder first). Opening a
source here costs metadata only — the folder's file names, the arrow files' memory maps, the parquet
footers, the tar headers — and `source[i]` reads image i when asked (by the latent cache builder or the
data loader). Every source is a `Sequence` of `ImageRecord`s in a fixed order; slices are views.

    folder of images        every image file below it (png, jpg, webp, ...), sorted by relative path
    `save_to_disk` folder   (state.json + data-*.arrow, e.g. `load_dataset("imagefolder").save_to_disk(...)`)
    *.arrow files           loose arrow files of a `datasets` cache, memory-mapped
    *.parquet files         e.g. a downloaded FFHQ / LHQ parquet dataset; read one row group at a time
    *.tar files             webdataset shards: members `<key>.<image ext>`, read by offset
"""

from __future__ import annotations

import bisect
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


@dataclass
class ImageRecord:
    """One image: a stable name (for cache keys and messages) and its encoded bytes or file path."""

    name: str
    data: bytes | str

    def open(self) -> Image.Image:
        source = io.BytesIO(self.data) if isinstance(self.data, bytes) else self.data
        with Image.open(source) as image:
            return image.convert("RGB")  # grey, palette, RGBA, CMYK → RGB


class ImageSource(Sequence):
    """`len` and `record(i)`; `source[i]` reads image i lazily, `source[a:b]` is a view."""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> ImageRecord:
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, slice):
            return SourceView(self, range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return self.record(index)


class SourceView(ImageSource):
    def __init__(self, source: ImageSource, indices: range):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, index: int) -> ImageRecord:
        return self.source.record(self.indices[index])


class ConcatSource(ImageSource):
    def __init__(self, sources: list[ImageSource]):
        self.sources, self.ends = sources, []
        for source in sources:
            self.ends.append((self.ends[-1] if self.ends else 0) + len(source))

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def record(self, index: int) -> ImageRecord:
        part = bisect.bisect_right(self.ends, index)
        return self.sources[part].record(index - (self.ends[part - 1] if part else 0))


class ListSource(ImageSource):
    """A handful of records already in memory (the photos shipped in wheels, tests)."""

    def __init__(self, records: list[ImageRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> ImageRecord:
        return self.records[index]


def _walk(root: Path) -> dict[str, list[str]]:
    """Relative paths below root, sorted, by kind ("image", ".parquet", ".arrow", ".tar"): names only (one
    os.scandir walk, no stat, no open)."""
    found, stack = {"image": [], ".parquet": [], ".arrow": [], ".tar": []}, [""]
    while stack:
        relative = stack.pop()
        with os.scandir(root / relative) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    stack.append(name)
                    continue
                suffix = os.path.splitext(entry.name)[1].lower()
                kind = "image" if suffix in IMAGE_SUFFIXES else suffix
                if kind in found:
                    found[kind].append(name)
    return {kind: sorted(names) for kind, names in found.items()}


class ImageFolder(ImageSource):
    def __init__(self, root: str | Path, names: list[str] | None = None):
        self.root = Path(root)
        self.names = _walk(self.root)["image"] if names is None else names

    def __len__(self) -> int:
        return len(self.names)

    def record(self, index: int) -> ImageRecord:
        return ImageRecord(self.names[index], str(self.root / self.names[index]))


def _column_record(value, index: int, column: str) -> ImageRecord:
    """A `datasets` Image value ({"bytes", "path"}) or raw bytes → a record."""
    if isinstance(value, dict):
        name = Path(value["path"]).name if value.get("path") else f"{index:08d}"
        data = value.get("bytes") or value.get("path")
        if data:
            return ImageRecord(name, data)
    elif isinstance(value, bytes):
        return ImageRecord(f"{index:08d}", value)
    raise ValueError(f"image_column {column!r} row {index} holds neither image bytes nor a path")


class ArrowDataset(ImageSource):
    """A `datasets.Dataset` (memory-mapped arrow); rows are read raw, decoding is ours (bad images are skipped)."""

    def __init__(self, dataset, column: str):
        if column not in dataset.column_names:
            raise ValueError(f"image_column {column!r} not in the dataset's columns {dataset.column_names}")
        self.dataset, self.column = dataset.with_format("arrow"), column

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> ImageRecord:
        value = self.dataset[index][self.column][0].as_py()
        return _column_record(value, index, self.column)


class ParquetFiles(ImageSource):
    """Parquet files read one row group at a time (the last one kept: sequential reads cost one read per group)."""

    def __init__(self, files: list[Path], column: str):
        import pyarrow.parquet as pq

        self.files, self.column, self.groups, self.ends = files, column, [], []
        for number, path in enumerate(files):
            metadata = pq.ParquetFile(path).metadata  # the footer only
            names = metadata.schema.to_arrow_schema().names
            if column not in names:
                raise ValueError(f"image_column {column!r} not in the columns {names} of {path}")
            for group in range(metadata.num_row_groups):
                self.groups.append((number, group))
                self.ends.append((self.ends[-1] if self.ends else 0) + metadata.row_group(group).num_rows)
        self._cached = None

    def __getstate__(self):  # data loader workers read their own row groups
        return {**self.__dict__, "_cached": None}

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def record(self, index: int) -> ImageRecord:
        import pyarrow.parquet as pq

        group = bisect.bisect_right(self.ends, index)
        if self._cached is None or self._cached[0] != group:
            number, row_group = self.groups[group]
            table = pq.ParquetFile(self.files[number]).read_row_group(row_group, columns=[self.column])
            self._cached = (group, table.column(self.column))
        value = self._cached[1][index - (self.ends[group - 1] if group else 0)].as_py()
        return _column_record(value, index, self.column)


class TarShards(ImageSource):
    """webdataset shards: one sample per image member (`<key>.<ext>`), read by its offset in the tar.

    Opening reads the tar headers (512 bytes per member), not the images."""

    def __init__(self, shards: list[Path]):
        self.shards, self.members = shards, []  # (shard number, name, data offset, size)
        for number, shard in enumerate(shards):
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile() and os.path.splitext(member.name)[1].lower() in IMAGE_SUFFIXES:
                        self.members.append((number, member.name, member.offset_data, member.size))

    def __len__(self) -> int:
        return len(self.members)

    def record(self, index: int) -> ImageRecord:
        number, name, offset, size = self.members[index]
        with open(self.shards[number], "rb") as file:
            return ImageRecord(name, os.pread(file.fileno(), size, offset))


def open_local(path: str | Path, column: str = "image") -> ImageSource:
    """The source at a local path, by what it holds (see the module docstring)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        names, path = {path.suffix: [path.name]}, path.parent
    elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))  # memory-mapped
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path} holds the splits {list(loaded)}; a 'train' split is needed")
            loaded = loaded["train"]
        return ArrowDataset(loaded, column)
    else:
        names = _walk(path)
    if names.get(".parquet"):
        return ParquetFiles([path / name for name in names[".parquet"]], column)
    if names.get(".arrow"):
        parts = [datasets.Dataset.from_file(str(path / name)) for name in names[".arrow"]]
        return ArrowDataset(datasets.concatenate_datasets(parts), column)
    if names.get(".tar"):
        return TarShards([path / name for name in names[".tar"]])
    if names.get("image"):
        return ImageFolder(path, names["image"])
    raise ValueError(f"{path} holds no images, nor .parquet / .arrow / .tar files")
