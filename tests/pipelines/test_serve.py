"""`fmboost serve`: the Gradio page's functions, the server answering `gradio_client`, and a real headless browser.

All on a tiny ×4 pixel-space upsampler (no attention above the bottleneck, so a 256 px output takes well under a
second on one CPU core). The browser test needs Debian's `chromium` + `chromium-driver` and Selenium (`.ci/run`
installs them) and skips with the reason where they are absent.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder, SamplerConfig, Upsampler
from fmboost.models.assets import REPO_ROOT, shared_path
from fmboost.pipelines.cli import main
from fmboost.pipelines.random_sd import random_sd_components
from fmboost.pipelines.serve import NO_BASE_MODEL, BoostService

SCALE = 4
PHOTO_SIZE = (64, 48)  # (W, H): 256x192 out
SERVER_START_S = 90


def no_gradio_reason():
    try:
        import gradio  # noqa: F401
    except ImportError:
        return 'needs Gradio: pip install -e ".[serve]"'
    return None


needs_gradio = pytest.mark.skipif(no_gradio_reason() is not None, reason=str(no_gradio_reason()))


@pytest.fixture(scope="module")
def upsampler_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = CFMUNet.from_preset("tiny", latent_channels=3, block_out_channels=(8, 16, 16),
                              attention_levels=(False, False, False)).eval()
    path = tmp_path_factory.mktemp("serve") / "upsampler"
    Upsampler(net, IdentityAutoencoder(), CouplingFlowMatcher(upsample="psu"), scale=SCALE,
              sampler=SamplerConfig(num_steps=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "base"
    StableDiffusionPipeline(**random_sd_components("tiny"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A real photo, downscaled to PHOTO_SIZE, as PNG: one of $FMBOOST_SHARED's photos where that folder exists,
    else scikit-image's `coffee` (a photo inside its wheel)."""
    photos = shared_path("data/photos")
    if photos is not None and sorted(photos.glob("*.jpg")):
        image = PIL.Image.open(sorted(photos.glob("*.jpg"))[0])
    else:
        import skimage.data

        image = PIL.Image.fromarray(skimage.data.coffee())
    path = tmp_path_factory.mktemp("serve") / "photo.png"
    image.convert("RGB").resize(PHOTO_SIZE, PIL.Image.LANCZOS).save(path)
    return path


def bicubic(path: Path) -> np.ndarray:
    image = PIL.Image.open(path).convert("RGB")
    return np.asarray(image.resize((image.width * SCALE, image.height * SCALE), PIL.Image.BICUBIC), dtype=np.float32)


def assert_upscaled(result: PIL.Image.Image, photo: Path):
    """4x the input's size, and not bicubic (mean |difference| above a grey level)."""
    assert result.size == (PHOTO_SIZE[0] * SCALE, PHOTO_SIZE[1] * SCALE)
    difference = np.abs(np.asarray(result.convert("RGB"), dtype=np.float32) - bicubic(photo)).mean()
    assert difference > 1.0, f"the result equals bicubic up-sampling (mean |diff| {difference:.3f})"


def event(app, api_name: str):
    """The Python function behind the page's event named `api_name`."""
    fns = app.fns.values() if isinstance(app.fns, dict) else app.fns
    return next(f.fn for f in fns if f.api_name == api_name)


# ---------------------------------------------------------------------- the page's functions, no server


@needs_gradio
def test_upscale_event_returns_slider_download_and_summary(upsampler_dir, photo, tmp_path):
    import gradio as gr
    from fmboost.pipelines.serve import build_app

    service = BoostService.load(str(upsampler_dir))
    app = build_app(service, output_dir=tmp_path)
    assert isinstance(app, gr.Blocks) and service.scale == SCALE and not service.has_detail
    (left, right), download, summary = event(app, "upscale")(PIL.Image.open(photo), "heun", 3, 1.0, 0, 7, "bicubic")
    np.testing.assert_array_equal(np.asarray(left, dtype=np.float32), bicubic(photo))  # before: bicubic
    assert_upscaled(right, photo)
    assert_upscaled(PIL.Image.open(download), photo)
    assert Path(download).parent == tmp_path
    assert "64x48 → 256x192" in summary and "heun:linear:3" in summary and "NFE 6" in summary
    assert "back-projection 0" in summary
    # same seed, same image; the steps control reaches the sampler
    again = event(app, "upscale")(PIL.Image.open(photo), "heun", 3, 1.0, 0, 7, "bicubic")
    again = again[0][1]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(right))
    # the back-projection control
    projected = event(app, "upscale")(PIL.Image.open(photo), "heun", 3, 1.0, 2, 7, "bicubic")
    assert "back-projection 2" in projected[2]
    assert not np.array_equal(np.asarray(projected[0][1]), np.asarray(right))
    with pytest.raises(gr.Error, match="upload an image"):
        event(app, "upscale")(None, "euler", 2, 1.0, 0, 0, "bicubic")


@needs_gradio
def test_generate_tab_is_disabled_with_the_reason_without_a_base_model(upsampler_dir):
    import gradio as gr
    from fmboost.pipelines.serve import build_app

    service = BoostService.load(str(upsampler_dir))
    assert service.generate_unavailable == NO_BASE_MODEL
    config = build_app(service).get_config_file()
    button = next(c for c in config["components"] if c["props"].get("elem_id") == "generate-button")
    assert button["props"]["interactive"] is False
    assert any(NO_BASE_MODEL in str(c["props"].get("value")) for c in config["components"])
    with pytest.raises(gr.Error, match="--base-model"):
        event(build_app(service), "generate")("a cat", "", 1, 7.5, 64, "euler", 2, 1.0, 0, 0)


@needs_gradio
def test_generate_event_with_a_base_model(upsampler_dir, base_dir, tmp_path):
    from fmboost.pipelines.serve import build_app

    service = BoostService.load(str(upsampler_dir), base_model=str(base_dir))
    assert service.generate_unavailable is None
    image, summary = event(build_app(service), "generate")("a cat", "", 1, 7.5, 64, "euler", 2, 1.0, 0, 0)
    assert image.size == (64 * SCALE, 64 * SCALE) and summary.startswith("256x256, sampler euler:linear:2")
    service.pipe.save_pretrained(tmp_path / "boost")  # a saved BoostPipeline as --upsampler brings its base along
    assert BoostService.load(str(tmp_path / "boost")).generate_unavailable is None


@pytest.mark.skipif(shared_path("weights/realesrgan/RealESRGAN_x4plus_fp16.safetensors") is None
                    or not shared_path("weights/realesrgan/RealESRGAN_x4plus_fp16.safetensors").is_file(),
                    reason="needs the Real-ESRGAN x4plus weights in $FMBOOST_SHARED/weights/realesrgan")
def test_real_esrgan_reference_is_the_peer_network_on_the_same_input(upsampler_dir, photo):
    from fmboost.models.degradations import to_uint8
    from fmboost.models.realesrgan import load_realesrgan, realesrgan_upscale

    service = BoostService.load(str(upsampler_dir))
    assert service.references == ("bicubic", "Real-ESRGAN") and service.realesrgan_unavailable is None
    done = service.upscale(PIL.Image.open(photo), "euler", 2, 1.0, 0, 0, reference="Real-ESRGAN")
    pixels = torch.from_numpy(np.asarray(PIL.Image.open(photo).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    expected = to_uint8(realesrgan_upscale(load_realesrgan(), pixels[None] / 127.5 - 1))[0]
    assert done.reference.size == done.result.size
    np.testing.assert_array_equal(np.asarray(done.reference), expected)  # 64x48 < one tile: the untiled forward
    assert np.abs(np.asarray(done.reference, dtype=np.float32) - bicubic(photo)).mean() > 1.0
    assert "slider: Real-ESRGAN ↔ fmboost" in done.summary


def test_without_real_esrgan_weights_the_reference_says_why(upsampler_dir, photo, tmp_path):
    service = BoostService.load(str(upsampler_dir))
    service.realesrgan_path = tmp_path / "missing.safetensors"
    assert service.references == ("bicubic",) and "weights not found" in service.realesrgan_unavailable
    with pytest.raises(Exception, match="weights not found"):
        service.upscale(PIL.Image.open(photo), "euler", 2, 1.0, 0, 0, reference="Real-ESRGAN")
    with pytest.raises(Exception, match="reference must be one of"):
        service.reference(PIL.Image.open(photo), "lanczos")


@needs_gradio
def test_generate_controls_start_at_the_base_defaults(upsampler_dir, tmp_path):
    """An LCM base starts the page at 4 base steps and its own guidance, not SD's 25 steps at 7.5."""
    from diffusers import LatentConsistencyModelPipeline
    from fmboost.pipelines.lcm import LCM_EMBEDDED_GUIDANCE, LCM_STEPS
    from fmboost.pipelines.serve import build_app

    LatentConsistencyModelPipeline(**random_sd_components("tiny", lcm=True), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path)
    service = BoostService.load(str(upsampler_dir), base_model=str(tmp_path))
    components = build_app(service).get_config_file()["components"]
    values = {c["props"].get("label"): c["props"].get("value") for c in components}
    assert (values["base steps"], values["guidance"]) == (LCM_STEPS, LCM_EMBEDDED_GUIDANCE)


def test_large_inputs_and_bad_settings_are_user_errors(upsampler_dir):
    service = BoostService.load(str(upsampler_dir), max_megapixels=0.001)
    with pytest.raises(Exception, match=r"limit of 0.001 MP: downscale it or restart with --max-megapixels"):
        service.upscale(PIL.Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="solver must be one of"):
        service.sampler("nope", 2)
    assert service.sampler("dopri5", 9).format() == "dopri5"
    with pytest.raises(ValueError, match="needs a posterior-mean upsampler"):
        service.sampler("euler", 2, 0.5)
    with pytest.raises(ValueError, match="back_project must be an int >= 0"):
        service.sampler("euler", 2, 1.0, -1)


def test_serve_without_gradio_names_the_extra(upsampler_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["serve", "--upsampler", str(upsampler_dir)]) == 2
    assert 'pip install "fmboost[serve]"' in capsys.readouterr().err


# ---------------------------------------------------------------------- `fmboost serve` as a process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(upsampler_dir, log: Path, *options: str):
    """`fmboost serve --upsampler DIR *options` on 127.0.0.1 in a subprocess, its output in `log`; yields its URL
    once the page answers, stops it (by its pid) afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "fmboost.pipelines.cli", "serve", "--upsampler",
                                    str(upsampler_dir), "--host", "127.0.0.1", "--port", str(port), *options],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"fmboost serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"fmboost serve did not answer on {url} within {SERVER_START_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(upsampler_dir, tmp_path_factory):
    """`fmboost serve` on the tiny upsampler; yields its URL."""
    if no_gradio_reason():
        pytest.skip(no_gradio_reason())
    with running_server(upsampler_dir, tmp_path_factory.mktemp("serve") / "server.log") as url:
        yield url


def test_server_upscale_endpoint_returns_a_4x_image_to_gradio_client(server, photo):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    slider, download, summary = client.predict(handle_file(str(photo)), "euler", 2, 1.0, 0, 0, "bicubic",
                                               api_name="/upscale")
    assert_upscaled(PIL.Image.open(download), photo)
    assert "NFE 2" in summary


# ---------------------------------------------------------------------- a real browser


def browser_or_skip():
    """A headless Chromium driven by Selenium, or skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs Selenium: pip install selenium")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs a Chromium browser and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


READ_IMAGE_JS = """
const [src, done] = arguments;
fetch(src).then(r => r.blob()).then(blob => {
    const reader = new FileReader();
    reader.onload = () => done(reader.result);
    reader.readAsDataURL(blob);
}).catch(err => done("error: " + err));
"""


def test_browser_uploads_a_photo_and_gets_the_upscaled_result(server, photo, tmp_path):
    import base64
    import io

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    if no_gradio_reason():
        pytest.skip(no_gradio_reason())
    browser = browser_or_skip()
    screenshot = tmp_path / "serve_upscale.png"
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 45)
        upload = wait.until(expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "#upscale-input input[type=file]")))
        upload.send_keys(str(photo))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#upscale-input img")))
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "upscale-button"))).click()
        images = wait.until(lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#upscale-slider img")
                                       if i.get_attribute("src")] or None)
        wait.until(lambda b: "NFE" in (b.find_element(By.CSS_SELECTOR, "#upscale-summary textarea")
                                       .get_attribute("value") or ""))
        browser.save_screenshot(str(screenshot))
        read = []
        for image in images:
            data = browser.execute_async_script(READ_IMAGE_JS, image.get_attribute("src"))
            assert data.startswith("data:image/"), data
            read.append(PIL.Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB"))
    finally:
        browser.quit()
    artefacts = REPO_ROOT / "runs" / "test-artefacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, artefacts / screenshot.name)
    print(f"screenshot: {artefacts / screenshot.name}")
    assert len(read) == 2, f"expected the slider's two images (bicubic, fmboost), got {len(read)}"
    before, after = read
    np.testing.assert_allclose(np.asarray(before, dtype=np.float32), bicubic(photo), atol=1)
    assert_upscaled(after, photo)
