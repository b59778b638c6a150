"""The server's web page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): a
question with an uploaded image is answered, the answer is drawn while it denoises (masked positions first,
filled step by step) and ends as the API's text; a screenshot of the rendered answer is checked."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from lladav_jax.inference import SamplingParams
from lladav_jax.inference.text import token_pieces

from tests.serving import ServerProcess, write_tiny_model

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMEDRIVER) and not os.environ.get("LLADAV_REQUIRE_BROWSER"):
  pytest.skip("no /usr/bin/chromedriver (apt-get install chromium chromium-driver; .ci/run does)",
              allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("page")
  model_dir, model = write_tiny_model(str(root))
  s = ServerProcess(model_dir, "--max-num-seqs", "2", log_path=str(root / "server.log"))
  yield s, model, root
  s.stop()


@pytest.fixture(scope="module")
def browser():
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
    opts.add_argument(a)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
  yield d
  d.quit()


def test_the_page_answers_and_shows_the_denoising(server, browser, tmp_path):
  srv, model, root = server
  img = root / "shapes.png"
  Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 80, 3), np.uint8)).save(img)
  browser.get(srv.url + "/")
  browser.find_element(By.ID, "q").send_keys("What shape is the red object?")
  browser.find_element(By.ID, "img").send_keys(str(img))
  WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#thumbs img"))
  for field, value in (("max_tokens", "16"), ("block_length", "8"), ("steps", "16")):
    el = browser.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)
  # every frame the page draws: how many positions are still masked
  browser.execute_script("""
    window.frames_seen = [];
    new MutationObserver(() => { const v = document.getElementById('live');
      if (v) window.frames_seen.push(v.querySelectorAll('.m').length); })
      .observe(document.getElementById('log'), {childList: true, subtree: true});""")
  browser.find_element(By.ID, "send").click()
  WebDriverWait(browser, 240).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]"),
                                    message=str(browser.get_log("browser")))
  assert browser.find_element(By.ID, "err").text == ""
  want = model.generate(["What shape is the red object?"], [[Image.open(img)]],
                        SamplingParams(gen_length=16, block_length=8, steps=16))[0]
  meta = browser.find_element(By.CSS_SELECTOR, ".assistant .meta").text
  assert meta.startswith("final: ") and f'"{want.text}"' in meta and "NFE 16" in meta
  live = browser.find_element(By.ID, "live")
  shown = "".join(s.text for s in live.find_elements(By.TAG_NAME, "span"))
  # the live view: each committed answer token's own text up to the stop, special tokens kept visible (the
  # API's text leaves them out)
  pieces = "".join(token_pieces(model.tokenizer, want.token_ids))
  assert shown.split() == pieces.split() and not live.find_elements(By.CSS_SELECTOR, ".m")
  masks = [m for m in browser.execute_script("return window.frames_seen") if m]
  assert len(masks) >= 4 and masks == sorted(masks, reverse=True)  # masked positions filled in step by step

  shot = tmp_path / "page.png"
  live.screenshot(str(shot))  # the rendered answer: coloured token backgrounds (the trace's step hues)
  px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
  coloured = px[(px.max(1) - px.min(1)) > 40]
  assert len(coloured) > 0.02 * len(px), "the answer's tokens are not drawn"
  full = tmp_path / "full.png"
  browser.save_screenshot(str(full))
  os.makedirs(os.environ.get("LLADAV_SCREENSHOT_DIR", str(tmp_path)), exist_ok=True)
  shutil.copy(full, os.path.join(os.environ.get("LLADAV_SCREENSHOT_DIR", str(tmp_path)), "serve_page.png"))
