"""The route explorer driven in a real headless Chromium: budget selection, a click on the scatter,
classification of a shipped test image, two routes side by side, bad inputs, a screenshot; offline."""
from __future__ import annotations

import pytest
import timm
import torch
from explorer_page import ExplorerPage, answered, find_browser, wait_idle
from PIL import Image
from selenium.webdriver.common.by import By

from timm_stitch.explorer import build_app, launch
from timm_stitch.explorer_logic import shipped_image

pytestmark = pytest.mark.integration

MODEL = 'snnet_vit_fmnist_tsb'
DISAGREEING = 66  # a shipped test image on which routes 17 and 33 answer different classes


@pytest.fixture(scope='module')
def model():
    return timm.create_model(MODEL, pretrained=True).eval()


@pytest.fixture(scope='module')
def page(model):
    chromium, driver, reason = find_browser()
    if reason:
        pytest.skip(reason)
    # the page's flow is under test here, not the machine's quiet: a loaded CI machine times some routes unstably,
    # which the page reports and leaves unmeasured (the spread check has its own tests in test_profile_spread.py)
    app = launch(build_app(model, latency_max_spread=None), block=False, quiet=True)
    try:
        page = ExplorerPage(app.local_url, chromium, driver)
        try:
            yield page
        finally:
            page.close()
    finally:
        app.close()


def _route_output(model, index: int, stitch_id: int) -> int:
    """The model's own top-1 for shipped test image ``index`` on route ``stitch_id``, outside the page."""
    from timm.data import create_transform, resolve_data_config
    image, _ = shipped_image(index)
    x = create_transform(**resolve_data_config(model=model))(image.convert('L')).unsqueeze(0)
    with torch.no_grad():
        return int(model(x, stitch_id=stitch_id).argmax())


def test_page_loads_offline(page):
    assert page.foreign_requests() == []
    assert page.first_contentful_paint_ms() > 0
    notes = page.text('notes')
    assert 'latency not measured' in notes  # the shipped card holds no latency for this machine: said, not shown
    assert 'not measured' in page.text('routes')


def test_budget_selects_as_select_stitch(page, model):
    expected = model.select_stitch(max_macs=12e6).id
    message = page.select_budget(max_macs='12M')
    assert f'route {expected}' in message
    page.wait_for(lambda: page.selected_route() == expected and page.highlighted_route() == expected,
                  f'route {expected} to be selected and highlighted')
    expected = model.select_stitch(max_macs=40e6, min_top1=88.0).id
    page.select_budget(max_macs='40M', min_top1='88')
    page.wait_for(lambda: page.highlighted_route() == expected, f'route {expected} to be highlighted')
    assert f'route {expected}' in page.text('route-info')


def test_impossible_budget_is_a_message(page):
    before = page.selected_route()
    message = page.select_budget(max_macs='1k')
    assert 'No route selected' in message and 'below the smallest available macs' in message
    assert 'Traceback' not in page.driver.page_source
    assert page.selected_route() == before
    message = page.select_budget(min_top1='101')
    assert 'min top-1 (%) must be a number in [0, 100]' in message


def test_click_selects_route(page):
    page.click_route(18)
    page.wait_for(lambda: page.selected_route() == 18 and page.highlighted_route() == 18,
                  'route 18 to be selected by the click')


def test_classify_shipped_image_and_compare(page, model, tmp_path):
    expected = model.select_stitch(max_macs=12e6).id
    page.select_budget(max_macs='12M')
    page.wait_for(lambda: page.highlighted_route() == expected, f'route {expected} to be highlighted')
    page.choose_compare(33)
    page.set_image_index(DISAGREEING)
    first, second = page.classify()
    route, top1 = answered(first)
    assert route == expected
    assert top1 == _route_output(model, DISAGREEING, expected) != _route_output(model, DISAGREEING, 33)
    assert 'latency now:' in first and 'true label:' in first
    route, top1 = answered(second)
    assert (route, top1) == (33, _route_output(model, DISAGREEING, 33))
    wait_idle()
    shot = tmp_path / 'explorer.png'
    page.screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and image.size[1] >= 1000


def test_non_image_upload_is_a_message(page, tmp_path):
    bogus = tmp_path / 'notes.txt'
    bogus.write_text('not an image')
    page.upload(str(bogus))
    page.wait_for(lambda: 'notes' in page.text('upload').split('\n'), 'the upload')
    first, _ = page.classify()
    assert 'Not classified' in first and "'notes.txt' is not an image" in first
    assert 'Traceback' not in page.driver.page_source


def test_measure_latency_then_latency_axis(page, model):
    page.click('measure-latency')
    page.wait_for(lambda: 'latency not measured' not in page.text('notes'), 'the latency to be measured')
    assert 'not measured' not in page.text('routes')
    page.driver.find_element(By.XPATH, "//*[@id='x-axis']//label[contains(., 'measured latency')]").click()
    title = "return document.querySelector('#route-plot .js-plotly-plot')._fullLayout.xaxis.title.text"
    page.wait_for(lambda: page.js(title).startswith('latency (ms'), 'the latency axis')
    drawn = page.js("return document.querySelector('#route-plot .js-plotly-plot').data"
                    ".filter(t => ['stitched routes', 'anchors'].includes(t.name))"
                    ".reduce((n, t) => n + t.x.length, 0)")
    assert drawn == model.num_routes
