"""The ERF explorer (``srdxai explore``): one self-contained HTML page whose embedded ERFs are
SRD's, and which, in a real headless browser (Debian's chromium, driven by selenium), shows
the clicked position's ERF."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import srdxai
from srdxai.cli import cli
from srdxai.errors import InvalidInputError
from srdxai.models import user
from srdxai.report import explorer

NET_CODE = '''
import torch
from torch import nn

def make_net(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def _net() -> nn.Module:
    namespace: dict = {}
    exec(NET_CODE, namespace)
    return namespace["make_net"]().eval()


@pytest.fixture
def page(tmp_path) -> dict:
    (tmp_path / "net.py").write_text(NET_CODE)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3),
                                                      dtype=np.uint8)).save(photo)
    out = tmp_path / "photo.html"
    result = CliRunner().invoke(cli, ["explore", str(photo), "--builder",
                                      f"{tmp_path / 'net.py'}:make_net", "--size", "32",
                                      "--methods", "gradcam,saliency", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    text = out.read_text()
    data = json.loads(re.search(r"<script id='explorer-data' type='application/json'>(.*?)"
                                r"</script>", text, re.S).group(1))
    x = user.preprocess(np.asarray(Image.open(photo).convert("RGB")), user.image_spec(32))
    return {"path": out, "text": text, "data": data, "x": x}


def _decoded(layer: dict, k: int) -> np.ndarray:
    r = layer["res"]
    raw = np.frombuffer(base64.b64decode(layer["erf"]), dtype=np.uint8)
    return raw[k * r * r:(k + 1) * r * r].reshape(r, r)


def test_the_page_is_self_contained_and_holds_srds_erfs(page):
    text, data = page["text"], page["data"]
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    assert "<script src" not in text and "<link" not in text
    assert [layer["name"] for layer in data["layers"]] == ["3", "5"]  # the deepest two
    assert text.count("class='grid'") == 2 and "gradcam" in text and "saliency" in text
    model = _net()
    srd = srdxai.SRD(model)
    for layer in data["layers"]:
        assert len(layer["scales"]) == layer["h"] * layer["w"] and layer["res"] == 32
        for (i, j) in [(0, 0), (layer["h"] // 2, layer["w"] - 1)]:
            k = i * layer["w"] + j
            expected = srd.erf(page["x"], layer=layer["name"], position=(i, j))[0].double()
            scale = layer["scales"][k]
            assert scale == pytest.approx(float(expected.abs().max()), rel=1e-6)
            stored = (_decoded(layer, k).astype(np.float64) - 128) / 127 * scale
            # one byte per pixel: within half a quantisation step of SRD's ERF
            assert np.abs(stored - expected.numpy()).max() <= scale / 254 + 1e-9


def test_layers_and_refusals(tmp_path):
    shapes = [("input", (3, 64, 64)), ("a", (8, 64, 64)), ("b", (8, 16, 16)),
              ("b2", (8, 16, 16)), ("c", (8, 8, 8)), ("fc", (10,))]
    assert explorer.default_layers(shapes) == ["b2", "c"]
    model = _net()
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(InvalidInputError, match="no layer 'nope'"):
        explorer.explore(model, x, ["nope"])
    with pytest.raises(InvalidInputError, match="positions"):
        explorer.explore(model, x, ["1"])  # 64 x 64 = 4096 positions
    with pytest.raises(InvalidInputError, match="one square image"):
        explorer.explore(model, torch.rand(2, 3, 32, 32), ["5"])
    result = CliRunner().invoke(cli, ["explore", str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_encoding_round_trip_and_colours():
    erfs = torch.tensor([[[0.0, 1.0], [-2.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])
    data, scales, r = explorer.encode_erfs(erfs, 8)
    raw = np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(2, 2, 2)
    assert r == 2 and scales == [2.0, 0.0]
    np.testing.assert_array_equal(raw[0], [[128, 192], [1, 160]])
    assert (raw[1] == 128).all()
    rgb = explorer.colour(np.array([-1.0, 0.0, 1.0]), signed=True)
    np.testing.assert_array_equal(rgb, [[0, 0, 255], [255, 255, 255], [255, 0, 0]])


def _browser():
    selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install "
                                                      "-e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(make test does with apt where it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1200"):
        options.add_argument(flag)
    del selenium
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_clicking_a_position_shows_that_positions_erf_in_a_browser(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get(Path(page["path"]).as_uri())
        assert driver.execute_script("return window.srdxaiExplorer !== undefined")
        layers = page["data"]["layers"]
        for index, (row, col) in [(0, (2, 5)), (1, (1, 3)), (1, (3, 0))]:
            layer = layers[index]
            grid = driver.find_elements(By.CSS_SELECTOR, ".grid")[index]
            size = grid.size
            # the centre of cell (row, col), from the grid's top-left corner
            dx = (col + 0.5) * size["width"] / layer["w"] - size["width"] / 2
            dy = (row + 0.5) * size["height"] / layer["h"] - size["height"] / 2
            ActionChains(driver).move_to_element_with_offset(grid, int(dx), int(dy)).click(
            ).perform()
            shown = driver.execute_script(
                "const c = document.getElementById('erf');"
                "return [c.dataset.layer, Number(c.dataset.row), Number(c.dataset.col), "
                "c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, "
                "c.height).data)];")
            assert shown[:3] == [layer["name"], row, col]
            r = shown[3]
            pixels = np.array(shown[4], dtype=np.uint8).reshape(r, r, 4)[..., :3]
            k = row * layer["w"] + col
            expected = explorer.colour((_decoded(layer, k).astype(np.float64) - 128) / 127,
                                       signed=True, bound=1.0)
            assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1
            caption = driver.find_element(By.ID, "erf-caption").text
            assert f"({row}, {col})" in caption and layer["name"] in caption
    finally:
        driver.quit()
