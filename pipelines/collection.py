"""Upscale a collection: many inputs in one run, resumable, split between processes.

`fmboost upscale a.png photos/ 'shots/**/*.jpg' /data/faces_parquet -o out/` loads the model once and writes
`out/<name>` for every input, where `name` is the input's path below the folder, dataset or glob prefix it came
from (a single file: its file name; a dataset row: its 8-digit row number; a webdataset member: its member name),
with the suffix `--ext` (png). Inputs are read lazily through `fmboost.train.image_sources` (the readers training
uses), so opening ten thousand photos or a parquet dataset costs their names only.

Three choices make what is on disk trustworthy:

- *Seeds from names.* Input `name` is drawn with `image_seed(seed, name)`, so its output does not depend on which
  run, process or position wrote it; `fmboost upscale that.png -o x.png --seed image_seed(seed, name)` writes the
  same image.
- *Batches fixed by the input list.* Float rounding differs with the batch an image is rendered in (≈ 1e-6, which
  flips a few 8-bit values), so batches must not depend on the number of processes or on what a killed run
  finished. The list is cut into chunks of `batch_size` consecutive inputs; chunk k belongs to process
  k mod P; inside a chunk the readable images are grouped by size, and each group is one batch. A rerun renders
  a group again only if one of its outputs is missing, and writes only the missing ones.
- *Atomic writes.* An output is written to `<out>/.fmboost-upscale/tmp/`, flushed to disk and renamed into
  place, so no half-written file ever carries a final name; a rerun removes what a killed run left there.

Unreadable, empty, too-large and non-image inputs are listed with their reason in `<out>/upscale_report.json`
(rewritten by every complete run: a bad input has no output, so every run reads it again) and the run goes on.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import torch
from fmboost.pipelines.cli import UserError
from fmboost.train.image_sources import IMAGE_SUFFIXES, ImageFolder, ImageRecord, ImageSource, TarShards, open_local
from tqdm.auto import tqdm

REPORT_NAME = "upscale_report.json"
STATE_DIR = ".fmboost-upscale"
SETTINGS_NAME = "settings.json"
#: Characters that make an argument a glob pattern (Python's `glob` syntax; `**` crosses folders).
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Input:
    """One input: its name in the collection (unique; the output mirrors it) and where to read it."""

    name: str
    source: ImageSource
    index: int

    def record(self) -> ImageRecord:
        return self.source.record(self.index)


@dataclass
class BadInput(Exception):
    """An input that cannot be upscaled: `kind` is one of empty / too-large / not-an-image / unreadable."""

    kind: str
    reason: str


@dataclass
class Summary:
    """What one process did in one run (`failures`: [{"input", "kind", "reason"}])."""

    written: int = 0
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def image_seed(seed: int, name: str) -> int:
    """The seed of input `name` in a run with `--seed seed`: 63 bits of SHA-256 of both, the same on any machine
    (Python's `hash` of a string is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


# ---------------------------------------------------------------------- which inputs


def _glob_inputs(pattern: str, exclude: Path) -> list[Input]:
    """Image files matching `pattern` (those below `exclude`, the output folder, left out), named by their path
    below the pattern's last folder without glob characters."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    names = sorted(str(Path(path).relative_to(root)) for path in glob.glob(pattern, recursive=True)
                   if Path(path).is_file() and Path(path).suffix.lower() in IMAGE_SUFFIXES
                   and not Path(path).resolve().is_relative_to(exclude))
    if not names:
        raise UserError(f"{pattern!r} matches no image file")
    folder = ImageFolder(root, names)
    return [Input(name, folder, i) for i, name in enumerate(names)]


def _source_inputs(path: Path, column: str, exclude: Path) -> list[Input]:
    """The inputs of a folder, dataset or shard file: a folder's images by relative path (those below `exclude`,
    the output folder, left out), webdataset members by member name, dataset rows by row number."""
    try:
        source = open_local(path, column)
    except ValueError as err:
        raise UserError(str(err)) from None
    if isinstance(source, ImageFolder):
        root = source.root.resolve()
        if exclude == root:
            raise UserError(f"-o {exclude} is the input folder {path} itself: give the outputs their own folder")
        if exclude.is_relative_to(root):  # `fmboost upscale photos -o photos/x4`: a rerun must not read its outputs
            below = str(exclude.relative_to(root)) + os.sep
            source = ImageFolder(source.root, [n for n in source.names if not (n + os.sep).startswith(below)])
        names = source.names
        return [Input(name, source, i) for i, name in enumerate(names)]
    if isinstance(source, TarShards):
        return [Input(member[1], source, i) for i, member in enumerate(source.members)]
    return [Input(f"{i:08d}", source, i) for i in range(len(source))]


def collect_inputs(arguments: list[str], out_dir: str | Path, column: str = "image") -> list[Input]:
    """Every input the command line names, in argument order (each folder, glob and dataset in its own sorted
    order): image files (any suffix: a named file that is not an image is reported, not skipped), folders
    (recursive, image suffixes), glob patterns, local Hugging Face datasets (`column`: the image column) and
    webdataset shards. Two inputs with one name would write one output: a UserError naming them."""
    exclude = Path(out_dir).resolve()
    inputs: list[Input] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_file() and path.suffix.lower() not in (".tar", ".parquet", ".arrow"):
            inputs.append(Input(path.name, ImageFolder(path.parent, [path.name]), 0))
        elif path.exists():
            inputs.extend(_source_inputs(path, column, exclude))
        elif GLOB_CHARS & set(argument):
            inputs.extend(_glob_inputs(argument, exclude))
        else:
            raise UserError(f"input {argument!r} not found")
    seen: dict[str, int] = {}
    for item in inputs:
        seen[item.name] = seen.get(item.name, 0) + 1
    twice = sorted(name for name, count in seen.items() if count > 1)
    if twice:
        raise UserError(f"{len(twice)} input names occur twice (e.g. {twice[:3]}), so their outputs would collide: "
                        "upscale the inputs that share names into separate -o folders")
    return inputs


def output_path(out_dir: Path, name: str, ext: str) -> Path:
    return out_dir / Path(name).with_suffix(f".{ext}")


# ---------------------------------------------------------------------- reading and writing


def read_image(record: ImageRecord, max_megapixels: float) -> PIL.Image.Image:
    """The decoded RGB image, or BadInput saying why not. The size is checked from the header before decoding,
    and the whole image is decoded here, so a truncated file fails now, not inside a batch."""
    try:
        size = len(record.data) if isinstance(record.data, bytes) else os.path.getsize(record.data)
    except OSError as err:
        raise BadInput("unreadable", f"cannot read the file: {err.strerror or err}") from None
    if size == 0:
        raise BadInput("empty", "the file is empty (0 bytes)")
    try:
        with PIL.Image.open(io.BytesIO(record.data) if isinstance(record.data, bytes) else record.data) as image:
            megapixels = image.width * image.height / 1e6
            if megapixels > max_megapixels:
                raise BadInput("too-large", f"{image.width}x{image.height} ({megapixels:.1f} MP) is above "
                                            f"--max-megapixels {max_megapixels:g}")
            image.load()
            return image.convert("RGB")
    except PIL.UnidentifiedImageError:
        raise BadInput("not-an-image", f"not an image file ({size} bytes that no image format reads)") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise BadInput("unreadable", f"cannot decode the image: {err}") from None


def save_atomic(image: PIL.Image.Image, path: Path, tmp_dir: Path) -> None:
    """Write `image` to `path` so that `path` is either absent or whole: into `tmp_dir` (on the same file
    system), flushed to disk, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}{path.suffix}"
    try:
        with open(tmp, "wb") as file:
            image.save(file, format=PIL.Image.registered_extensions()[path.suffix.lower()])
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, Ctrl-C) leaves nothing; a kill leaves tmp, removed on rerun
        tmp.unlink(missing_ok=True)
        raise


def check_ext(ext: str) -> str:
    """`ext` without its dot, if PIL writes it; else a UserError."""
    ext = ext.lstrip(".").lower()
    if f".{ext}" not in PIL.Image.registered_extensions():
        raise UserError(f"--ext {ext!r} is not an image format PIL writes (use png, jpg or webp)")
    return ext


def prepare_output(out_dir: Path, settings: dict, overwrite: bool, state) -> Path:
    """Make `out_dir` ready on every process and return its temporary folder. The main process removes what a
    killed run left there and refuses a folder whose outputs were made with other settings (a rerun would mix
    the two) unless `overwrite`; the other processes wait for it."""
    tmp_dir = out_dir / STATE_DIR / "tmp"
    if state.is_main_process:
        saved = out_dir / STATE_DIR / SETTINGS_NAME
        if saved.is_file() and not overwrite:
            before = json.loads(saved.read_text())
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if changed:
                raise UserError(f"{out_dir} holds outputs made with other settings ({changed}, as (then, now)): "
                                "rerun with those settings to resume, or pass --overwrite to redo them")
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        saved.write_text(json.dumps(settings, indent=1))
    state.wait_for_everyone()
    return tmp_dir


# ---------------------------------------------------------------------- the run


def chunks_of(num_inputs: int, batch_size: int, process_index: int, num_processes: int) -> list[range]:
    """This process's chunks: input ranges of `batch_size`, chunk k to process k mod num_processes (every
    input in exactly one chunk of exactly one process)."""
    starts = range(process_index * batch_size, num_inputs, num_processes * batch_size)
    return [range(start, min(start + batch_size, num_inputs)) for start in starts]


def size_groups(images: dict[int, PIL.Image.Image]) -> list[list[int]]:
    """Indices of the readable images grouped by size, in input order (each group is one batch)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in images.items():
        groups.setdefault(image.size, []).append(index)
    return list(groups.values())


def upscale_collection(render: Callable, inputs: list[Input], out_dir: Path, ext: str, batch_size: int,
                       max_megapixels: float, overwrite: bool, tmp_dir: Path, state) -> Summary:
    """This process's share of `inputs` (see `chunks_of`), rendered by `render(images, names)` → images and
    written to `out_dir`; outputs already there are skipped unless `overwrite`. Bad inputs are recorded in the
    summary and printed; the run goes on."""
    summary, start = Summary(), time.perf_counter()
    mine = chunks_of(len(inputs), batch_size, state.process_index, state.num_processes)
    total = sum(len(chunk) for chunk in mine)
    desc = "upscale" + (f" (process 0's share of {state.num_processes})" if state.num_processes > 1 else "")
    with tqdm(total=total, desc=desc, unit="img", disable=not state.is_main_process, dynamic_ncols=True) as bar:
        for chunk in mine:
            targets = {i: output_path(out_dir, inputs[i].name, ext) for i in chunk}
            missing = {i for i in chunk if overwrite or not targets[i].exists()}
            summary.skipped += len(chunk) - len(missing)
            if missing:
                images = {}
                for i in chunk:
                    try:
                        images[i] = read_image(inputs[i].record(), max_megapixels)
                    except BadInput as bad:
                        summary.failures.append({"input": inputs[i].name, **asdict(bad)})
                        tqdm.write(f"skipped {inputs[i].name}: {bad.reason}")
                for group in size_groups(images):
                    if not missing.intersection(group):
                        continue
                    results = render([images[i] for i in group], [inputs[i].name for i in group])
                    for i, result in zip(group, results):
                        if i in missing:
                            save_atomic(result, targets[i], tmp_dir)
                            summary.written += 1
            bar.update(len(chunk))
            bar.set_postfix(written=summary.written, skipped=summary.skipped, failed=len(summary.failures))
    summary.seconds = time.perf_counter() - start
    return summary


def write_report(out_dir: Path, inputs: list[Input], summaries: list[Summary], settings: dict) -> dict:
    """`<out>/upscale_report.json` (atomically) from every process's summary: the counts, the images per second
    of the run (written images over the slowest process's seconds) and every failed input once, by name."""
    seconds = max(s.seconds for s in summaries)
    written = sum(s.written for s in summaries)
    report = {"inputs": len(inputs), "written": written, "skipped": sum(s.skipped for s in summaries),
              "failed": sum(len(s.failures) for s in summaries), "processes": len(summaries),
              "seconds": round(seconds, 3), "images_per_second": round(written / seconds, 3) if seconds else None,
              "settings": settings,
              "failures": sorted((f for s in summaries for f in s.failures), key=lambda f: f["input"])}
    tmp = out_dir / STATE_DIR / f"{REPORT_NAME}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out_dir / REPORT_NAME)
    return report


def generators(device: torch.device, seed: int, names: list[str]) -> list[torch.Generator]:
    """One generator per batch row, seeded from the row's input name."""
    return [torch.Generator(device).manual_seed(image_seed(seed, name)) for name in names]
