"""sdo ui in a real browser: Debian's headless Chromium driven by Selenium (no browser download), on the page served
on 127.0.0.1. An edit by two strategies shows both results and their metrics rows; a bad input shows the command
line's message; cancel stops the run. With SDO_UI_SCREENSHOTS=DIR the screenshots are written there (docs/ui.md:
`SDO_UI_SCREENSHOTS=docs/ui python -m pytest tests/test_ui_browser.py`)."""

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _serve(out, **options):
    """The page on a free port of 127.0.0.1 and a headless Chromium: (driver, url, app)."""
    from sdo.ui.page import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(out, **options)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    chrome = webdriver.ChromeOptions()
    chrome.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        chrome.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=chrome), f"http://127.0.0.1:{port}/", app


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("ui")
    driver, url, app = _serve(out)
    try:
        yield driver, url, out
    finally:
        driver.quit()
        app.close()


def _open(driver, url):
    driver.get(url)
    _wait(lambda: driver.find_elements(By.ID, "edit-run"), 60, "the page to load")


def _wait(condition, seconds, what):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def _type(driver, selector, text):
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)
    field.send_keys(Keys.TAB)


def _status(driver):
    return driver.find_element(By.ID, "edit-status").text


def _shot(driver, name, tmp_path):
    folder = Path(os.environ.get("SDO_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))


def test_an_edit_by_two_strategies_shows_both_results(page, tmp_path):
    driver, url, out = page
    _open(driver, url)
    digit = lambda: driver.find_element(By.CSS_SELECTOR, "#edit-digit input").get_attribute("value")
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#edit-gallery img")) == 40, 30, "the gallery")
    driver.find_elements(By.CSS_SELECTOR, "#edit-gallery img")[5].click()  # picks held-out digit 5
    _wait(lambda: digit() == "5", 30, "the picked digit")
    _type(driver, "#edit-iterations input", "3")
    driver.find_element(By.ID, "edit-run").click()
    _wait(lambda: _status(driver).startswith("running"), 120, "the run to report progress")
    _wait(lambda: _status(driver).startswith(("done", "error")), 300, "the run to finish")
    assert _status(driver).startswith("done: 2 strategies"), _status(driver)
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#edit-images img")) == 3, 30, "before + 2 afters")
    table = driver.find_element(By.ID, "edit-metrics").text
    assert "sdo" in table and "full" in table
    runs = sorted(out.glob("edit-*.zip"))
    assert runs and {p.name for p in runs[-1].with_suffix("").iterdir()} == {"sdo", "full"}
    assert json.loads((runs[-1].with_suffix("") / "sdo" / "metrics.json").read_text())["settings"]["digit"] == 5
    _shot(driver, "edit", tmp_path)


def test_a_bad_input_shows_the_command_lines_message(page):
    driver, url, out = page
    _open(driver, url)
    before = set(out.iterdir())
    _type(driver, "#edit-prompt textarea", "")
    driver.find_element(By.ID, "edit-run").click()
    status = _wait(lambda: _status(driver) if _status(driver).startswith("error") else None, 60, "the error")
    assert "prompt" in status and "\n" not in status
    _type(driver, "#edit-prompt textarea", "a thick 8")
    _type(driver, "#edit-lr input", "-1")
    driver.find_element(By.ID, "edit-run").click()
    status = _wait(lambda: _status(driver) if "lr" in _status(driver) else None, 60, "the lr error")
    assert status.startswith("error:")
    assert set(out.iterdir()) == before  # refused before any work: no run folder


def test_cancel_stops_a_run(page):
    driver, url, out = page
    _open(driver, url)
    _type(driver, "#edit-iterations input", "400")
    driver.find_element(By.ID, "edit-run").click()
    _wait(lambda: "iteration" in _status(driver), 120, "the run to iterate")
    driver.find_element(By.ID, "edit-cancel").click()
    _wait(lambda: _status(driver) == "cancelled", 30, "the page to say cancelled")
    _wait(lambda: not any(t.name == "sdo-job" for t in threading.enumerate()), 60, "the job's thread to end")
    newest = max(out.glob("edit-*"), key=lambda p: p.stat().st_mtime)
    assert not newest.with_suffix(".zip").exists() and not (newest / "full").exists()


def _tab(driver, name):
    next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name).click()


def _running(folder_name: str) -> bool:
    """Whether a process whose command line names ``folder_name`` is alive (an `sdo finetune` of the page)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if folder_name in cmdline.read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def test_fine_tune_shows_the_reward_and_samples_as_it_trains(page, tmp_path):
    driver, url, out = page
    _open(driver, url)
    _tab(driver, "Fine-tune")
    _type(driver, "#tune-seconds input", "6")
    driver.find_element(By.ID, "tune-start").click()
    status = lambda: driver.find_element(By.ID, "tune-status").text
    _wait(lambda: status().startswith("update"), 180, "the first update")
    _wait(lambda: status().startswith(("done", "error")), 180, "the run to end")
    assert status().startswith("done:"), status()
    assert driver.find_elements(By.CSS_SELECTOR, "#tune-samples img")
    assert driver.find_element(By.ID, "tune-guard").text.startswith(("guard:", "no guard"))
    _shot(driver, "finetune", tmp_path)
    folder = max((p for p in out.glob("finetune-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    _type(driver, "#tune-folder textarea", str(folder))  # open it again, as an existing run
    driver.find_element(By.ID, "tune-open").click()
    _wait(lambda: status().startswith("done:") and str(folder) in status(), 30, "the opened run")


def test_stop_ends_a_training_and_keeps_its_checkpoint(page):
    driver, url, out = page
    _open(driver, url)
    _tab(driver, "Fine-tune")
    _type(driver, "#tune-seconds input", "600")
    driver.find_element(By.ID, "tune-start").click()
    status = lambda: driver.find_element(By.ID, "tune-status").text
    _wait(lambda: status().startswith("update"), 180, "the first update")
    folder = max((p for p in out.glob("finetune-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    driver.find_element(By.ID, "tune-stop").click()
    _wait(lambda: status().startswith("stopped"), 30, "the page to say stopped")
    _wait(lambda: not _running(folder.name), 60, "the training process to end")
    assert any((folder / "checkpoints").iterdir()) and not (folder / "summary.json").exists()


def test_the_attack_tab_compares_two_methods(page, tmp_path):
    driver, url, _ = page
    _open(driver, url)
    _tab(driver, "Adversarial")
    _type(driver, "#attack-samples input", "3")
    _type(driver, "#attack-iterations input", "3")
    driver.find_element(By.ID, "attack-run").click()
    status = lambda: driver.find_element(By.ID, "attack-status").text
    _wait(lambda: status().startswith(("done", "error")), 300, "the attack to finish")
    assert status().startswith("done: 2 methods on 3 samples"), status()
    table = driver.find_element(By.ID, "attack-table").text
    assert "sdo" in table and "full" in table and "[" in table  # the success with its Wilson interval
    assert driver.find_elements(By.CSS_SELECTOR, "#attack-images img")
    _shot(driver, "adversarial", tmp_path)


def test_the_cost_tab_runs_sdo_bench_and_shows_its_message_for_a_bad_value(page, tmp_path):
    driver, url, _ = page
    _open(driver, url)
    _tab(driver, "Cost")
    _type(driver, "#cost-steps input", "5")
    _type(driver, "#cost-sweep textarea", "2,5")
    driver.find_element(By.ID, "cost-run").click()
    status = lambda: driver.find_element(By.ID, "cost-status").text
    _wait(lambda: status().startswith(("done", "error")), 300, "sdo bench to finish")
    assert status().startswith("done:"), status()
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#cost-images img")) == 3, 30, "the three plots")
    assert "x sdo" in driver.find_element(By.ID, "cost-table").text
    _shot(driver, "cost", tmp_path)
    _type(driver, "#cost-sweep textarea", "2,x")
    driver.find_element(By.ID, "cost-run").click()
    _wait(lambda: status().startswith("error"), 120, "the command line's message")
    assert "--sweep" in status() and "\n" not in status()


def test_two_browser_tabs_run_their_own_edits(page):
    """Two tabs of the same page start an edit each; both finish (the second waits in the page's queue), each in a
    folder of its own whose metrics hold its own prompt."""
    driver, url, _ = page
    prompts = ("a thick 8", "a slanted 4")
    handles = []
    for n, prompt in enumerate(prompts):
        if n:
            driver.switch_to.new_window("tab")
        _open(driver, url)
        _type(driver, "#edit-prompt textarea", prompt)
        _type(driver, "#edit-iterations input", "3")
        driver.find_element(By.ID, "edit-run").click()
        handles.append(driver.current_window_handle)
    folders = []
    for handle in handles:
        driver.switch_to.window(handle)
        _wait(lambda: _status(driver).startswith(("done", "error")), 300, "both edits to finish")
        assert _status(driver).startswith("done"), _status(driver)
        folders.append(Path(_status(driver).rsplit(" in ", 1)[1]))
    driver.close()
    driver.switch_to.window(handles[0])
    assert folders[0] != folders[1]
    for folder, prompt in zip(folders, prompts, strict=True):
        assert json.loads((folder / "sdo" / "metrics.json").read_text())["prompt"] == prompt


@pytest.fixture(scope="module")
def pipeline_page(pipeline_folder, clip, tokenizer, classifier_folder, tmp_path_factory):
    """`sdo ui --model --clip --classifier` on the tiny Stable Diffusion, CLIP and ViT classifier."""
    root = tmp_path_factory.mktemp("pipeline-ui")
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    driver, url, app = _serve(root / "ui", model=str(pipeline_folder), clip=str(root / "clip"),
                              classifier=str(classifier_folder))
    try:
        yield driver, url, root / "ui"
    finally:
        driver.quit()
        app.close()


def test_a_pipeline_page_edits_an_uploaded_image(pipeline_page, tmp_path):
    """The Edit tab edits an uploaded image with the tiny Stable Diffusion."""
    import numpy as np
    from PIL import Image

    driver, url, _ = pipeline_page
    picture = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(picture)
    _open(driver, url)
    assert not driver.find_elements(By.ID, "edit-gallery")  # the digits are not offered: a pipeline edits an upload
    driver.find_element(By.CSS_SELECTOR, "#edit-upload input[type=file]").send_keys(str(picture))
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#edit-upload img"), 30, "the upload")
    _type(driver, "#edit-iterations input", "2")
    driver.find_element(By.ID, "edit-run").click()
    _wait(lambda: _status(driver).startswith(("done", "error")), 300, "the edit")
    assert _status(driver).startswith("done: 2 strategies"), _status(driver)
    table = driver.find_element(By.ID, "edit-metrics").text
    assert "sdo" in table and "full" in table


def test_a_pipeline_page_attacks_the_pipelines_generations(pipeline_page, tmp_path):
    """Adversarial with --classifier: two methods on two seeds' generations of a prompt, success with its interval;
    an empty prompt is refused with the command line's message."""
    driver, url, _ = pipeline_page
    _open(driver, url)
    _tab(driver, "Adversarial")
    status = lambda: driver.find_element(By.ID, "attack-status").text
    _type(driver, "#attack-prompt textarea", "")
    driver.find_element(By.ID, "attack-run").click()
    _wait(lambda: status().startswith("error"), 60, "the prompt's message")
    assert "prompt is empty" in status()
    _type(driver, "#attack-prompt textarea", "a red square")
    for field, value in (("samples", "2"), ("iterations", "2"), ("steps", "3")):
        _type(driver, f"#attack-{field} input", value)
    driver.find_element(By.ID, "attack-run").click()
    _wait(lambda: status().startswith(("done", "error")), 300, "the attack to finish")
    assert status().startswith("done: 2 methods on 2 samples"), status()
    table = driver.find_element(By.ID, "attack-table").text
    assert "sdo" in table and "full" in table and "[" in table
    folder = Path(status().rsplit(" in ", 1)[1])
    assert {p.name for p in (folder / "sdo").iterdir()} == {"seed-0", "seed-1"}
    assert json.loads((folder / "results.json").read_text())["request"]["prompt"] == "a red square"
    _shot(driver, "pipeline-adversarial", tmp_path)


def test_a_pipeline_page_times_the_pipelines_denoiser(pipeline_page):
    driver, url, _ = pipeline_page
    _open(driver, url)
    _tab(driver, "Cost")
    _type(driver, "#cost-steps input", "3")
    _type(driver, "#cost-sweep textarea", "2,3")
    driver.find_element(By.ID, "cost-run").click()
    status = lambda: driver.find_element(By.ID, "cost-status").text
    _wait(lambda: status().startswith(("done", "error")), 300, "sdo bench to finish")
    assert status().startswith("done:"), status()
    assert "UNet2DConditionModel" in driver.find_element(By.ID, "cost-table").text


def test_a_pipeline_page_fine_tunes_over_prompts(pipeline_page):
    driver, url, _ = pipeline_page
    _open(driver, url)
    _tab(driver, "Fine-tune")
    _type(driver, "#tune-prompts textarea", "a red square|a blue circle")
    _type(driver, "#tune-seconds input", "3")
    _type(driver, "#tune-steps input", "2")
    driver.find_element(By.ID, "tune-start").click()
    status = lambda: driver.find_element(By.ID, "tune-status").text
    _wait(lambda: status().startswith(("done", "error")), 300, "the run to end")
    assert status().startswith("done:"), status()
    assert driver.find_elements(By.CSS_SELECTOR, "#tune-samples img")
    folder = Path(status().split(" in ", 1)[1].split(";")[0])
    command = json.loads((folder / "command.json").read_text())
    assert command["prompts"] == "a red square|a blue circle" and command["reward"] == "clip"
