"""Driving the route explorer page in a real headless Chromium (selenium + the system chromedriver).

Used by ``tests/test_explorer_browser.py`` and ``benchmarks/bench_explorer.py``. Chromium starts with a fresh
profile and its background networking off, so that every request the page makes is to the local server.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
from typing import Callable, Optional

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome')
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1400,1900')


def find_browser() -> tuple[Optional[str], Optional[str], str]:
    """``(chromium, chromedriver, '')``, or Nones and why the browser cannot be had."""
    chromium = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which('chromedriver')
    missing = [name for name, path in (('chromium', chromium), ('chromedriver', driver)) if path is None]
    if missing:
        return None, None, (f'no headless browser: {" and ".join(missing)} not found on PATH (Debian: apt-get '
                            'install chromium chromium-driver; scripts/setup_env.sh does it when run as root)')
    return chromium, driver, ''


class ExplorerPage:
    """One Chromium session on the explorer page at ``url``."""

    def __init__(self, url: str, chromium: str, driver: str, timeout: float = 60.0):
        self.profile_dir = tempfile.mkdtemp(prefix='explorer-chromium-')
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f'--user-data-dir={self.profile_dir}'):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.timeout = timeout
        self.driver.get(url)
        self.wait_for(lambda: self.js("return !!document.querySelector('#route-plot .js-plotly-plot')"),
                      'the route scatter to render')

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    # ---- reading the page ----

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait_for(self, condition: Callable[[], object], what: str):
        """The first truthy value of ``condition()``; fails naming ``what`` after ``timeout`` seconds."""
        return WebDriverWait(self.driver, self.timeout, poll_frequency=0.1).until(
            lambda _: condition(), message=f'timed out waiting for {what}')

    def text(self, elem_id: str) -> str:
        return self.driver.find_element(By.ID, elem_id).text

    def settled_text(self, elem_id: str) -> Optional[str]:
        """The text of Markdown ``elem_id``, or None while Gradio updates it (its status tracker shown), read in one
        step so that an update cannot land between the two readings."""
        return self.js("""const root = document.getElementById(arguments[0]);
            const tracker = root.querySelector('[data-testid=status-tracker]');
            if ((tracker && !tracker.classList.contains('hide')) || root.querySelector('.pending')) return null;
            return (root.querySelector('[data-testid=markdown]') || root).innerText.trim();""", elem_id)

    def new_text(self, elem_id: str, before: Optional[str], what: str) -> str:
        """The text of Markdown ``elem_id`` once Gradio is done updating it and it differs from ``before``."""
        return self.wait_for(lambda: (t := self.settled_text(elem_id)) not in (None, '', before) and t, what)

    def first_contentful_paint_ms(self) -> float:
        """When the page first painted content, from the browser's performance timeline."""
        return self.js("return performance.getEntriesByName('first-contentful-paint')[0].startTime")

    def foreign_requests(self) -> list[str]:
        """Every resource the page loaded from anywhere but its own server."""
        return self.js("return performance.getEntriesByType('resource').map(e => e.name)"
                       ".filter(n => !n.startsWith(location.origin))")

    def selected_route(self) -> Optional[int]:
        value = self.driver.find_element(By.CSS_SELECTOR, '#selected-route input').get_attribute('value')
        return int(value) if value not in (None, '') else None

    def highlighted_route(self) -> Optional[int]:
        """The route the scatter marks as selected (its star trace), read from Plotly's own data."""
        return self.js("""const plot = document.querySelector('#route-plot .js-plotly-plot');
            const star = plot && plot.data.find(t => (t.name || '').startsWith('selected'));
            return star ? star.customdata[0][0] : null;""")

    # ---- acting on it ----

    def type_into(self, elem_id: str, text: str) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, f'#{elem_id} input, #{elem_id} textarea')
        box.send_keys(Keys.CONTROL, 'a')  # keys, not clear(): the page hears typed input only
        box.send_keys(Keys.DELETE, text)

    def click(self, elem_id: str) -> None:
        self.driver.find_element(By.ID, elem_id).click()

    def select_budget(self, max_macs: str = '', max_latency: str = '', min_top1: str = '') -> str:
        """Fill the budget boxes, press the button and return the message it leaves."""
        before = self.settled_text('budget-message')
        self.type_into('max-macs', max_macs)
        self.type_into('max-latency', max_latency)
        self.type_into('min-top1', min_top1)
        self.click('select-budget')
        return self.new_text('budget-message', before, 'the budget message')

    def click_route(self, route_id: int) -> None:
        """Click the marker of route ``route_id`` in the scatter, where Plotly drew it."""
        x, y = self.js("""const plot = document.querySelector('#route-plot .js-plotly-plot');
            const layout = plot._fullLayout, id = arguments[0];
            for (const trace of plot.data) {
              const i = (trace.customdata || []).findIndex(c => c[0] === id);
              if (i >= 0 && trace.mode === 'markers') {
                const box = plot.getBoundingClientRect();
                return [box.left + layout.xaxis._offset + layout.xaxis.l2p(trace.x[i]),
                        box.top + layout.yaxis._offset + layout.yaxis.l2p(trace.y[i])];
              }
            }
            return [null, null];""", route_id)
        assert x is not None, f'route {route_id} is not drawn in the scatter'
        # hover first, and let Plotly find the point under the pointer, as a user's hand would
        actions = ActionBuilder(self.driver)
        actions.pointer_action.move_to_location(round(x), round(y)).pause(0.5).click()
        actions.perform()

    def choose_compare(self, route_id: int) -> None:
        """Pick route ``route_id`` in the "compare with route" dropdown."""
        box = self.driver.find_element(By.CSS_SELECTOR, '#compare-route input')
        box.click()
        box.send_keys(f'{route_id}:')
        option = self.wait_for(lambda: next((o for o in self.driver.find_elements(By.CSS_SELECTOR, '[role=option]')
                                             if (o.get_attribute('aria-label') or '').startswith(f'{route_id}:')),
                                            None), 'the dropdown option')
        option.click()

    def set_image_index(self, index: int) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, '#image-index input[type=number]')
        box.send_keys(Keys.CONTROL, 'a')
        box.send_keys(str(index), Keys.TAB)

    def upload(self, path: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys(path)

    def classify(self) -> tuple[str, str]:
        """Press Classify; the two result panes once the first has changed."""
        before = self.settled_text('result-a')
        self.click('classify')
        return self.new_text('result-a', before, 'the classification'), self.settled_text('result-b')

    def screenshot(self, path: str) -> None:
        self.driver.save_screenshot(path)


def answered(result: str) -> tuple[int, int]:
    """``(route id, class index)`` of a result pane: 'route 17 (...) answered Dress (class 3, ...)'."""
    match = re.search(r'route (\d+) .*answered .*\(class (\d+),', result, re.S)
    assert match, f'not a classification result: {result!r}'
    return int(match.group(1)), int(match.group(2))


def wait_idle(seconds: float = 0.3) -> None:
    """Let the page settle (a redraw) before a screenshot."""
    time.sleep(seconds)
