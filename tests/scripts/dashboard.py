"""Drives the dashboard in headless Chromium (selenium, chromedriver) as a
user would, for tests/tests/dashboard.rs, which runs it inside a network
namespace of its own making. Prints one JSON object of what it saw;
asserts with messages, and leaves a screenshot of each page in SHOTS.

Arguments: BASE_URL VIEWER_TOKEN SHOTS_DIR TESTBUSCTL MANIFEST GO_FILE
ADMIN_TOKEN (the manifest's first step prints a line, then waits for
GO_FILE; files named GO_FILE.N gate the later tests).
"""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

base, token, shots, ctl, manifest, go_file, admin_token = sys.argv[1:8]
TIMEOUT = 30

opts = webdriver.ChromeOptions()
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
          "--ignore-certificate-errors", "--window-size=1280,900", "--no-first-run",
          "--disable-background-networking", "--disable-component-update"]:
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
seen = {}


def shot(name):
    driver.save_screenshot(os.path.join(shots, f"{name}.png"))


def wait(what, cond):
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(lambda d: cond())
    except Exception as e:
        shot("failed")
        src = driver.page_source
        # Chromium's own error page names the network error.
        errors = sorted(set(re.findall(r"(?:net::)?ERR_[A-Z0-9_]+", src)))
        raise AssertionError(f"waited {TIMEOUT}s for {what} ({e!r}); page: {driver.current_url} {errors}\n"
                             + src[-3000:])


# Live pages swap their <main> in place: elements are read in one script
# call each, never kept across a refresh.
def text_of(css):
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def attr_of(css, attr):
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
        css, attr)


def texts(css):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);", css)


def count(css):
    return driver.execute_script("return document.querySelectorAll(arguments[0]).length;", css)


def follow_link(css):
    """Goes where the link at css points, as a click does."""
    href = attr_of(css, "href")
    assert href, f"no link at {css}"
    driver.execute_script("document.querySelector(arguments[0]).click();", css)
    wait(f"the page at {href}", lambda: driver.current_url.endswith(href))


def load(url):
    """driver.get, again while Chromium still thinks it is offline: its
    network watcher takes a moment after start to see the namespace's
    addresses (ERR_INTERNET_DISCONNECTED, ERR_NETWORK_CHANGED)."""
    def loaded():
        driver.get(url)
        return not re.search(r"ERR_(INTERNET_DISCONNECTED|NETWORK_CHANGED)", driver.page_source)
    wait(f"Chromium to load {url}", loaded)


def apply(doc):
    out = subprocess.run([ctl, "apply", "-f", "-"], input=doc, capture_output=True, text=True)
    assert out.returncode == 0, out


def gate(n):
    """A shell loop that waits for GO_FILE.n."""
    return f"while [ ! -e {go_file}.{n} ]; do sleep 0.05; done"


def log_in(with_token):
    driver.execute_script("document.querySelector('input[name=token]').value = arguments[0];"
                          "document.querySelector('main form button').click();", with_token)


try:
    # Without a login the overview sends the browser to log in.
    load(base + "/")
    wait("the login page", lambda: driver.current_url.endswith("/login"))
    log_in("tbjoin.wrong")
    wait("a refused login", lambda: "token" in text_of("#login-error"))
    seen["bad_login"] = text_of("#login-error")
    log_in(token)
    wait("the overview", lambda: count("#hosts-by-phase") > 0)
    wait("the overview to go live", lambda: text_of("#live-state") == "live")

    # A test applied now appears without a reload: the marker set on this
    # page survives.
    driver.execute_script("window.__testbus_marker = 42;")
    out = subprocess.run([ctl, "apply", "-f", manifest], capture_output=True, text=True)
    assert out.returncode == 0, out
    wait("the new test on the overview", lambda: count("#test-web") > 0)
    assert driver.execute_script("return window.__testbus_marker") == 42, "the overview reloaded"
    shot("overview")

    # Its page: the step graph, live.
    follow_link("#test-web a")
    wait("step one running", lambda: attr_of("#step-one", "data-phase") == "Running")
    driver.execute_script("window.__testbus_marker = 43;")
    test_tab = driver.current_window_handle

    # Its output, followed live in a second tab.
    driver.switch_to.new_window("tab")
    load(base + "/tests/web/logs")
    wait("the first line", lambda: "first-line" in text_of("#log"))
    assert "second-line" not in text_of("#log")
    open(go_file, "w").close()
    wait("the second line, printed after the first was seen", lambda: "second-line" in text_of("#log"))
    wait("the end of the output", lambda: attr_of("#log-end", "data-ended") == "true")
    seen["log_lines"] = texts("#log .line")
    driver.execute_script("const s = document.getElementById('log-search'); s.value = 'second';"
                          "s.dispatchEvent(new Event('input'));")
    wait("the search to filter", lambda: text_of("#log-count").startswith("1 of"))
    seen["search"] = text_of("#log-count")
    shot("logs")

    # Two processes printing in turns: a1, then b1 and b2, then a2 (each
    # printed once the line before it was seen here). Read back afresh,
    # the lines are in the order they were received, whichever process
    # the server reads first; the timestamps show when asked.
    apply("apiVersion: testbus/v1\nkind: Test\nmetadata: {name: order}\nspec:\n  hosts: [{role: a}]\n"
          "  steps:\n"
          f"  - {{name: p, on: [a], argv: [sh, -c, 'echo a1; {gate(2)}; echo a2']}}\n"
          f"  - {{name: q, on: [a], argv: [sh, -c, '{gate(0)}; echo b1; {gate(1)}; echo b2']}}\n")
    load(base + "/tests/order/logs")
    for seen_line, n in [("a1", 0), ("b1", 1), ("b2", 2)]:
        wait(f"line {seen_line}", lambda: seen_line in text_of("#log"))
        open(f"{go_file}.{n}", "w").close()
    wait("the end of the output", lambda: attr_of("#log-end", "data-ended") == "true")
    load(base + "/tests/order/logs")
    wait("the end of the output, read again", lambda: attr_of("#log-end", "data-ended") == "true")
    seen["ordered"] = [l[-2:] for l in texts("#log .line")]
    seen["times_hidden"] = texts("#log .line")[0]
    driver.execute_script("document.getElementById('log-times').click();")
    seen["times_shown"] = texts("#log .line")[0]

    # Back on the test page, which was never reloaded: every step green.
    driver.switch_to.window(test_tab)
    wait("step two to succeed", lambda: attr_of("#step-two", "data-phase") == "Succeeded")
    assert attr_of("#step-one", "data-phase") == "Succeeded"
    assert driver.execute_script("return window.__testbus_marker") == 43, "the test page reloaded"
    wait("the test's phase", lambda: "Succeeded" in text_of("h1"))
    seen["processes"] = count("#processes tr[data-phase]")
    shot("test")

    # The JUnit download, with the browser's own session.
    href = attr_of("#download-junit", "href")
    junit = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.text()).then(done, e => done('error: ' + e));", href)
    root = ET.fromstring(junit)
    seen["junit_cases"] = [c.get("classname") + "/" + c.get("name") for c in root.iter("testcase")]
    seen["junit_out"] = "".join(e.text or "" for e in root.iter("system-out"))

    # A host page, from the process's host link.
    follow_link("#processes a[href^='/hosts/']")
    wait("the host page", lambda: text_of("h1").startswith("host/"))
    seen["host_title"] = text_of("h1")
    seen["host_processes"] = count("#host-processes tr") - 1
    shot("host")

    # History of the label the test carries, after two more runs (the
    # last one fails in its second step).
    for name, second in [("web-2", "true"), ("web-3", "false")]:
        doc = (f"apiVersion: testbus/v1\nkind: Test\nmetadata: {{name: {name}, labels: {{suite: web}}}}\n"
               f"spec:\n  hosts: [{{role: a}}]\n  steps:\n  - {{name: one, on: [a], argv: ['true']}}\n"
               f"  - {{name: two, on: [a], after: [one], argv: [sh, -c, 'echo broke-it >&2; {second}']}}\n")
        subprocess.run([ctl, "apply", "-f", "-", "--wait"], input=doc, capture_output=True, text=True)
    load(base + "/history?label=suite%3Dweb")
    wait("the history matrix", lambda: count("#history td.cell") > 0)
    seen["history_cells"] = driver.execute_script(
        "return Array.from(document.querySelectorAll('#history td.cell'), e => e.dataset.value);")
    seen["history_tip"] = attr_of("#history td.cell", "title")
    seen["history_legend"] = count("#history-legend .swatch")
    seen["history_points"] = count("#durations circle")
    shot("history")
    # A cell links to its run: the newest, web-3, failed; its page shows
    # the end of the failed step's stderr.
    follow_link("#history td.cell a")
    wait("the failed run's page", lambda: "Failed" in text_of("h1"))
    seen["failed_run"] = text_of("h1")
    seen["failed_stderr"] = text_of("#failed-stderr")
    seen["viewer_buttons"] = count("main form")

    # An admin: cancels a running test from its page, then reruns it.
    driver.delete_all_cookies()
    load(base + "/login")
    log_in(admin_token)
    wait("the overview, as an admin", lambda: count("#hosts-by-phase") > 0)
    apply("apiVersion: testbus/v1\nkind: Test\nmetadata: {name: slow, labels: {suite: slow}}\nspec:\n"
          "  hosts: [{role: a}]\n  steps:\n  - {name: s, on: [a], argv: [sleep, '600']}\n")
    load(base + "/tests/slow")
    wait("step s running", lambda: attr_of("#step-s", "data-phase") == "Running")
    driver.execute_script("document.getElementById('cancel-test').click();")
    wait("the test cancelled", lambda: "Cancelled" in text_of("h1"))
    seen["cancelled"] = text_of("#reason")
    shot("cancelled")
    driver.execute_script("document.getElementById('rerun-test').click();")
    wait("the rerun's page", lambda: re.search(r"/tests/slow-[a-z0-9]{5}$", driver.current_url))
    wait("the rerun running", lambda: attr_of("#step-s", "data-phase") == "Running")
    seen["rerun_of"] = text_of("main p.muted")
    driver.execute_script("document.getElementById('cancel-test').click();")
    wait("the rerun cancelled", lambda: "Cancelled" in text_of("h1"))
finally:
    driver.quit()
print(json.dumps(seen))
