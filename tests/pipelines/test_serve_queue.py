"""`fmboost serve` under concurrent clients: bad uploads refused before the queue with a message naming the
problem, every accepted request answered, and a bounded queue that tells the excess it is full."""

import threading
import time

import numpy as np
import PIL.Image
import pytest
from fmboost.pipelines.serve import BoostService

from .test_serve import no_gradio_reason, running_server

STEPS = 48  # ODE steps per request: long enough that requests wait in the queue




@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """{kind: path}: a good PNG and four bad uploads."""
    root = tmp_path_factory.mktemp("uploads")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "good.png")
    whole = (root / "good.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.png").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    PIL.Image.new("RGB", (600, 600)).save(root / "large.png")  # 0.36 MP, above the default 0.25
    return {p.stem: p for p in root.iterdir()}


EXPECTED = {"truncated": "image file is truncated", "notes": "not an image file", "empty": "the file is empty",
            "large": "above --max-megapixels 0.25"}


def test_open_upload_names_the_problem(upsampler_dir, uploads):
    from fmboost.pipelines.cli import UserError

    service = BoostService.load(str(upsampler_dir))
    assert service.open_upload({"path": str(uploads["good"]), "orig_name": "good.png"}).size == (64, 48)
    assert service.open_upload(str(uploads["good"])).mode == "RGB"
    for kind, message in EXPECTED.items():
        with pytest.raises(UserError, match=message):
            service.open_upload({"path": str(uploads[kind]), "orig_name": f"{kind}.png"})
    with pytest.raises(UserError, match="upload an image first"):
        service.open_upload(None)


@pytest.fixture(scope="module")
def server(upsampler_dir, tmp_path_factory):
    """`fmboost serve --concurrency 1 --max-queue 4` in a subprocess; yields its URL."""
    if no_gradio_reason():
        pytest.skip(no_gradio_reason())
    with running_server(upsampler_dir, tmp_path_factory.mktemp("queue") / "server.log", "--concurrency", "1",
                        "--max-queue", "4") as url:
        yield url


def call(url, path, seed, results, client=None):
    """One /upscale request (through `client`, else a new one); results[seed] = (ok, seconds, summary or error
    message, finish time)."""
    from gradio_client import Client, handle_file

    client = client or Client(url, verbose=False)
    start = time.monotonic()
    try:
        out = client.predict(handle_file(str(path)), "euler", STEPS, 1.0, 0, seed, "bicubic", api_name="/upscale")
        results[seed] = (True, time.monotonic() - start, out[2], time.monotonic())
    except Exception as err:  # gradio_client raises its own error types
        results[seed] = (False, time.monotonic() - start, str(err), time.monotonic())


def test_bad_uploads_are_refused_before_the_queue_and_the_queue_is_bounded(server, uploads):
    results, threads = {}, []

    def start(path, seed, client=None):
        threads.append(threading.Thread(target=call, args=(server, path, seed, results, client)))
        threads[-1].start()

    for seed in range(3):  # one rendering, two waiting: the queue is busy but below its bound
        start(uploads["good"], seed)
    time.sleep(1.0)
    for number, kind in enumerate(EXPECTED):
        call(server, uploads[kind], 100 + number, results)
        ok, seconds, message, finished = results[100 + number]
        assert not ok and EXPECTED[kind] in message and f"{kind}.png" in message, message
        assert seconds < 5.0
        # refused while good requests queued before it were still waiting: it did not take its turn
        assert any(seed not in results or results[seed][3] > finished for seed in range(3))
    from gradio_client import Client

    # More than the queue holds, sent together: the clients connect first (slow under load), then all send.
    clients = {seed: Client(server, verbose=False) for seed in range(3, 10)}
    for seed, client in clients.items():
        start(uploads["good"], seed, client)
    for thread in threads:
        thread.join(timeout=300)
    good = [results[seed] for seed in range(10)]
    full = [r for r in good if not r[0]]
    assert full and all("Queue is full" in r[2] for r in full)  # the excess is told, not queued
    assert all(r[0] and "NFE 48" in r[2] for r in good if "Queue is full" not in r[2])
    assert all(results[seed][0] for seed in range(3))  # every accepted request is answered
