"""The status pages' HTML: tables and line charts, one self-contained document.

Built for an air-gapped machine: inline CSS, server-rendered SVG charts, and a
small inline script; nothing is fetched from anywhere but the page's own
path, and a ``Content-Security-Policy`` header says so to the browser too.
The script asks the same path for its body (``?part=body``) once a second and
swaps it in, so the one renderer here draws both the first page and every
update (the numbers come from the same dictionary as ``/status.json``).
Without JavaScript the page shows the numbers as of its loading and reloads
itself every :data:`NOSCRIPT_REFRESH` seconds.
"""

from __future__ import annotations

import html
import math
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import attrs
from twisted.web import server

from svckit.history import SIZE
from svckit.responses import BytesResponse, HTTPError, JSONResponse

NOSCRIPT_REFRESH = 5
POLICY = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self';"
          " img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2")
HTML_TYPE = b"text/html; charset=utf-8"

Cell = Union[str, Tuple[str, str]]
"""A table cell: its text, or (text, state) where state is ``ok``, ``warn`` or ``bad``."""


@attrs.frozen
class Table:
    """A titled table."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    empty: str = "none"


@attrs.frozen
class Chart:
    """A line chart of series sampled every ``interval`` seconds, oldest first, None for gaps."""

    title: str
    unit: str
    series: Mapping[str, Sequence[Optional[float]]]
    interval: float = 1.0
    slots: int = SIZE
    """Points the time axis holds (the newest at the right edge): ten minutes of seconds."""


Block = Union[Table, Chart]


def number(value: Optional[float], digits: int = 0, unit: str = "") -> str:
    """A number for a cell: thousands separated, ``—`` when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}" if unit else text


def _cell(cell: Cell) -> str:
    text, state = (cell, "") if isinstance(cell, str) else cell
    attr = f' class="{state}"' if state else ""
    return f"<td{attr}>{html.escape(text)}</td>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    head = f"<thead><tr>{head}</tr></thead>" if any(table.columns) else ""
    if table.rows:
        body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    else:
        body = f'<tr><td colspan="{len(table.columns)}">{html.escape(table.empty)}</td></tr>'
    return (f'<section><h2>{html.escape(table.title)}</h2><div class="wrap"><table>'
            f"{head}<tbody>{body}</tbody></table></div></section>")


WIDTH, HEIGHT = 600, 140


def _chart(chart: Chart) -> str:
    known = [v for values in chart.series.values() for v in values if v is not None]
    top = max(known, default=0.0)
    top = top * 1.1 if top > 0 else 1.0
    length = max(chart.slots, max((len(v) for v in chart.series.values()), default=0))
    span = max(length - 1, 1)
    lines: List[str] = []
    legend: List[str] = []
    for (label, values), colour in zip(chart.series.items(), COLOURS):
        segments: List[List[str]] = [[]]
        offset = length - len(values)
        for i, value in enumerate(values):
            if value is None:
                segments.append([])
                continue
            x = (offset + i) / span * WIDTH
            y = HEIGHT - value / top * HEIGHT
            segments[-1].append(f"{x:.1f},{y:.1f}")
        for points in segments:
            if len(points) == 1:
                points = points * 2
            if points:
                lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(points)}"/>')
        last = next((v for v in reversed(values) if v is not None), None)
        legend.append(f'<span style="color:{colour}">■</span> {html.escape(label)}: '
                      f'<b>{html.escape(number(last, 2 if last is not None and last < 10 else 0))}</b>')
    minutes = length * chart.interval / 60
    peak = number(top / 1.1, 3 if top < 1.1 else 1)
    return (f'<section><h2>{html.escape(chart.title)}</h2>'
            f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" preserveAspectRatio="none" role="img"'
            f' aria-label="{html.escape(chart.title)}">'
            f'<line x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" stroke="#999"/>{"".join(lines)}</svg>'
            f'<div class="axis"><span>{minutes:.0f} min ago</span><span>max {html.escape(peak)}'
            f" {html.escape(chart.unit)}</span><span>now</span></div>"
            f'<div class="legend">{" · ".join(legend)}</div></section>')


def body(title: str, summary: Sequence[Cell], blocks: Sequence[Block]) -> str:
    """The page's body: a heading, a summary line, the blocks."""
    facts = " ".join(f'<span class="fact{"" if isinstance(c, str) else " " + c[1]}">'
                     f"{html.escape(c if isinstance(c, str) else c[0])}</span>" for c in summary)
    parts = [f"<h1>{html.escape(title)}</h1><p>{facts}</p>"]
    parts += [_table(b) if isinstance(b, Table) else _chart(b) for b in blocks]
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:70rem;
padding:.75rem;color:#111;background:#fff}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1rem;margin:1.2rem 0 .3rem}
.wrap{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd;white-space:nowrap}
th{background:#f3f4f6;font-weight:600}
.ok{color:#166534;background:#dcfce7}.warn{color:#854d0e;background:#fef9c3}.bad{color:#991b1b;background:#fee2e2}
.fact{display:inline-block;margin:0 .5rem .3rem 0;padding:.1rem .4rem;border-radius:.25rem;background:#f3f4f6}
svg{width:100%;height:140px;background:#fafafa;border:1px solid #eee}
.axis{display:flex;justify-content:space-between;color:#666;font-size:12px}.legend{font-size:13px}
#live{float:right;font-size:12px;color:#666}body[data-live="0"] #live{color:#991b1b}
"""

SCRIPT = """
(function () {
  var page = document.getElementById("page"), live = document.getElementById("live");
  function refresh() {
    fetch(location.pathname + "?part=body", {cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
      .then(function (text) {
        page.innerHTML = text;
        document.body.setAttribute("data-live", "1");
        live.textContent = "live, updated " + new Date().toLocaleTimeString();
      })
      .catch(function () {
        document.body.setAttribute("data-live", "0");
        live.textContent = "not updating: the daemon does not answer";
      })
      .then(function () { setTimeout(refresh, 1000); });
  }
  live.textContent = "live";
  setTimeout(refresh, 1000);
})();
"""


def document(title: str, inner: str) -> bytes:
    """The whole page around a body."""
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title>"
        f"<noscript><meta http-equiv=\"refresh\" content=\"{NOSCRIPT_REFRESH}\"></noscript>"
        f"<style>{STYLE}</style></head><body>"
        "<span id=\"live\">static: reloads every few seconds without JavaScript</span>"
        f"<main id=\"page\">{inner}</main><script>{SCRIPT}</script></body></html>"
    ).encode()


PageParts = Tuple[str, Sequence[Cell], Sequence[Block]]


def page_response(request: server.Request, title: str, parts: PageParts) -> BytesResponse:
    """``GET /status``: the document, or only its body with ``?part=body`` (the script's refresh)."""
    headers = {"Content-Security-Policy": POLICY, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    part = request.args.get(b"part")
    if part is None:
        return BytesResponse(document(title, body(*parts)), content_type=HTML_TYPE, headers=headers)
    if part != [b"body"]:
        raise HTTPError(400, "part must be body")
    return BytesResponse(body(*parts).encode("utf-8"), content_type=HTML_TYPE, headers=headers)


def json_response(status: object) -> JSONResponse:
    """``GET /status.json``: never cached."""
    return JSONResponse(status, headers={"Cache-Control": "no-store"})
