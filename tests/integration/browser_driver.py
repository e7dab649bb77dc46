"""Drives Debian's chromium through Playwright, one JSON command a line on stdin, one answer a line on stdout.

Run with the CPython environment's interpreter (Playwright's ``greenlet``
may not install on PyPy 3.9), while the daemons under test run on either
runtime; :class:`tests.integration.browser.Browser` is the other end.

Commands (``op`` and its arguments):

* ``open`` ``url``, ``javascript`` (default true): a new page (new context);
  every request it makes from now on is recorded;
* ``cells`` ``table`` (its ``h2`` title): the table's rows, as lists of cell texts;
* ``text``: the page's visible text;
* ``wait_text`` ``text``, ``timeout``: until the page shows ``text``; the seconds it took, or null;
* ``screenshot`` ``path``: a full-page PNG;
* ``requests``: every URL requested so far;
* ``close``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"


def main() -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context: Any = None
        page: Any = None
        requested: List[str] = []
        print(json.dumps({"ok": True, "version": browser.version}), flush=True)
        for line in sys.stdin:
            command: Dict[str, Any] = json.loads(line)
            op = command["op"]
            answer: Dict[str, Any] = {"ok": True}
            try:
                if op == "open":
                    if context is not None:
                        context.close()
                    context = browser.new_context(java_script_enabled=command.get("javascript", True),
                                                  viewport={"width": 1200, "height": 900})
                    page = context.new_page()
                    page.on("request", lambda request: requested.append(request.url))
                    page.goto(command["url"], wait_until="load")
                    answer["title"] = page.title()
                elif op == "cells":
                    table = page.locator("section", has=page.locator("h2", has_text=command["table"])).locator("table")
                    answer["rows"] = table.evaluate(
                        "t => Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.innerText))")
                elif op == "text":
                    answer["text"] = page.inner_text("body")
                elif op == "wait_text":
                    start = time.monotonic()
                    try:
                        page.get_by_text(command["text"]).first.wait_for(timeout=command["timeout"] * 1000)
                        answer["seconds"] = time.monotonic() - start
                    except Exception:
                        answer["seconds"] = None
                elif op == "screenshot":
                    page.screenshot(path=command["path"], full_page=True)
                elif op == "requests":
                    answer["urls"] = list(requested)
                elif op == "close":
                    break
                else:
                    answer = {"ok": False, "error": f"unknown op {op}"}
            except Exception as e:
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(answer), flush=True)
        browser.close()
        print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    main()
