"""`fmboost bench collection`: a folder upscaled by one command against a shell loop of single-image commands,
one process against two, and (`--faults N`) N kills at random moments followed by reruns.

Every run is the `fmboost upscale` command as a user starts it (a subprocess, model load included), so images/s
are what a user measures with a stopwatch: the shell loop and the one command with torch's default threads (what a
user gets), one process against two with one thread each (what splitting a CPU between processes means). The
inputs are the first `--count` images of `--data` folders, resized to `--size`² under `--work`. The fault test
mixes in 5 % bad inputs (truncated, empty, non-image), kills the run (SIGKILL to the launcher and every process it
started) at a uniformly random moment of what an uninterrupted run would still need (its duration × the fraction
of outputs missing), reruns, and finally checks that every good input has exactly one whole output equal to the
uninterrupted run's, that nothing else is in the output folder, and that the report lists every bad input once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
from fmboost.pipelines import collection
from fmboost.pipelines.cli_options import add_output_option
from fmboost.train.image_sources import open_local


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upsampler", required=True, help="upsampler folder")
    parser.add_argument("--data", nargs="+", required=True, help="image folders the inputs are taken from")
    parser.add_argument("--count", type=int, default=200, help="inputs (default 200)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (default 64)")
    parser.add_argument("--loop-count", type=int, default=20,
                        help="images the shell loop upscales (its images/s is per image, default 20)")
    parser.add_argument("--fast-loop-count", type=int, default=3,
                        help="images the shell loop upscales with --fast (each command compiles again; default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="time the shell loop against one command, fast path off and on, and one process against "
                             "two (--no-throughput: only the fault test)")
    parser.add_argument("--faults", type=int, default=0, help="kills per process count in the fault test (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="the kill moments' random seed")
    parser.add_argument("--work", default="runs/bench_collection", help="inputs and outputs go here")
    add_output_option(parser, "the JSON result (default: %(default)s)", default="bench_collection.json")


def make_inputs(data: list[str], count: int, size: int, folder: Path) -> Path:
    """The first `count` images of the `data` folders as size² PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [record for root in data for record in open_local(root)][:count]
    for number, record in enumerate(records):
        record.open().resize((size, size), PIL.Image.BICUBIC).save(folder / f"{number:04d}.png")
    return folder


def add_bad_inputs(folder: Path, count: int) -> list[str]:
    """`count` bad inputs in `folder`, a third each truncated, empty and non-image; their names."""
    whole = next(folder.glob("*.png")).read_bytes()
    names = []
    for number in range(count):
        name = f"bad{number:03d}.png"
        kind = number % 3
        (folder / name).write_bytes(whole[: len(whole) // 2] if kind == 0 else b"" if kind == 1 else b"text\n")
        names.append(name)
    return names


def command(inputs, out, upsampler, processes: int = 1, *extra) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m"] if processes > 1 else [sys.executable, "-m"]
    return [*launcher, "fmboost.pipelines.cli", "upscale", *map(str, inputs), "-o", str(out), "--upsampler",
            str(upsampler), *map(str, extra)]


def environment(one_thread: bool = True) -> dict:
    """The commands' environment: one thread per process, or torch's default (every core)."""
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if one_thread else base


def timed(argv: list[str], one_thread: bool = True) -> float:
    """Wall-clock seconds of a command that must succeed (exit 0, or 1: some inputs failed)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=environment(one_thread), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout[-2000:]}")
    return time.perf_counter() - start


def images(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(PIL.Image.open(p)) for p in sorted(out.rglob("*.png"))
            if collection.STATE_DIR not in p.parts}


def output_count(out: Path) -> int:
    """Outputs under their final names in `out` (counted, not decoded: `compare` checks them at the end)."""
    return sum(collection.STATE_DIR not in p.parts for p in out.rglob("*.png")) if out.exists() else 0


def compare(a: Path, b: Path) -> dict:
    """Files in both, byte-identical files, and the largest 8-bit difference."""
    first, second = images(a), images(b)
    same_names = first.keys() == second.keys()
    identical = sum((a / n).read_bytes() == (b / n).read_bytes() for n in first if n in second)
    worst = max((int(np.abs(first[n].astype(int) - second[n].astype(int)).max()) for n in first if n in second),
                default=0)
    return {"same_names": same_names, "files": len(first), "byte_identical": identical, "max_abs_diff": worst}


def bench_throughput(args, inputs: Path, work: Path) -> dict:
    """Images/s of the shell loop and of one command (default threads), fast path off and on."""
    files = sorted(inputs.glob("*.png"))
    result = {}
    for fast in ((), ("--fast",)):
        key = "fast" if fast else "eager"
        loop_out = work / f"loop_{key}"
        shutil.rmtree(loop_out, ignore_errors=True)
        loop_out.mkdir()
        loop_count = args.fast_loop_count if fast else args.loop_count
        loop = sum(timed(command([f], loop_out / f.name, args.upsampler, 1, *fast), one_thread=False)
                   for f in files[:loop_count])
        out = work / f"one_command_{key}"
        shutil.rmtree(out, ignore_errors=True)
        one = timed(command([inputs], out, args.upsampler, 1, "--batch-size", args.batch_size, *fast),
                    one_thread=False)
        result[key] = {"loop_images_per_s": loop_count / loop, "loop_images": loop_count,
                       "command_images_per_s": len(files) / one, "command_images": len(files)}
        result[key]["speedup"] = result[key]["command_images_per_s"] / result[key]["loop_images_per_s"]
        print(f"{key}: shell loop {result[key]['loop_images_per_s']:.3f} images/s, one command "
              f"{result[key]['command_images_per_s']:.3f} images/s ({result[key]['speedup']:.1f}×)", flush=True)
    return result


def bench_processes(args, inputs: Path, work: Path) -> dict:
    """One process against two, one thread each: images/s of both, and their outputs compared."""
    files = sorted(inputs.glob("*.png"))
    result = {}
    for processes in (1, 2):
        out = work / f"processes_{processes}"
        shutil.rmtree(out, ignore_errors=True)
        seconds = timed(command([inputs], out, args.upsampler, processes, "--batch-size", args.batch_size))
        result[f"{processes}_images_per_s"] = len(files) / seconds
    result["two_vs_one"] = compare(work / "processes_1", work / "processes_2")
    print(f"one process {result['1_images_per_s']:.3f} images/s, two {result['2_images_per_s']:.3f} images/s "
          f"(one thread each); outputs: {result['two_vs_one']}", flush=True)
    return result


def bench_faults(args, inputs: Path, work: Path, processes: int, rng: random.Random) -> dict:
    """`args.faults` kills at random moments, each followed by a rerun, then a run to the end; the checks."""
    bad = add_bad_inputs(inputs, max(1, round(0.05 * len(list(inputs.glob("*.png"))))))
    reference, out = work / f"faults_reference_{processes}", work / f"faults_{processes}"
    for folder in (reference, out):
        shutil.rmtree(folder, ignore_errors=True)
    argv = lambda target: command([inputs], target, args.upsampler, processes, "--batch-size", args.batch_size)
    duration = timed(argv(reference))
    good, kills = len(list(inputs.glob("*.png"))) - len(bad), []
    for _ in range(args.faults):
        missing = 1 - output_count(out) / good
        moment = rng.uniform(0, duration * max(missing, 0.05))
        process = subprocess.Popen(argv(out), env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(moment)
        running = process.poll() is None
        if running:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and every process it started
        process.wait()
        kills.append({"at_s": round(moment, 2), "mid_run": running,
                      "outputs": output_count(out)})
    timed(argv(out))
    report = json.loads((out / collection.REPORT_NAME).read_text())
    listed = [failure["input"] for failure in report["failures"]]
    stray = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and collection.STATE_DIR not in p.parts
             and p.suffix != ".png" and p.name != collection.REPORT_NAME]
    result = {"processes": processes, "kills": kills, "good_inputs": good,
              "vs_uninterrupted": compare(reference, out), "bad_listed_once": sorted(listed) == sorted(bad),
              "stray_files": stray, "leftover_tmp": len(list((out / collection.STATE_DIR / "tmp").iterdir()))}
    for name in bad:
        (inputs / name).unlink()
    print(f"faults, {processes} process(es): {json.dumps(result)}", flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    work = Path(args.work)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    make_inputs(args.data, args.count, args.size, inputs)
    result = {"inputs": args.count, "size": args.size, "upsampler": args.upsampler, "batch_size": args.batch_size,
              "cpu_count": os.cpu_count()}
    if args.throughput:
        result["throughput"] = bench_throughput(args, inputs, work)
        result["processes"] = bench_processes(args, inputs, work)
    if args.faults:
        rng = random.Random(args.seed)
        result["faults"] = [bench_faults(args, inputs, work, processes, rng) for processes in (1, 2)]
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0
