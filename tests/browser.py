"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
JSON messages separated by NUL on file descriptors 3 and 4), so the report test needs no
websocket library and opens no port.

`load(url, screenshot=...)` opens a page, waits for its load event, and returns what a person
would notice: console errors, uncaught exceptions, failed or non-file requests, and, for each
`<img>`, whether it decoded.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    section_ids: list[str] = field(default_factory=list)
    section_tops: dict[str, float] = field(default_factory=dict)  # px from the page top
    title: str = ""
    height: int = 0


class Browser:
    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def fds() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes replies
            a, b = os.dup(to_child_r), os.dup(from_child_w)  # out of the way of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.log = Path(self.profile) / "stderr.txt"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    binary,
                    *FLAGS,
                    f"--user-data-dir={self.profile}",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=fds,  # noqa: PLW1509 - the test process starts no threads
                pass_fds=(3, 4),
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read()
            if m.get("method") == method:
                return m
            self.events.append(m)

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                err = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise TimeoutError(f"no answer from the browser in {self.timeout} s {err[-2000:]}")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PROBE = """(() => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
    naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
  const secs = [...document.querySelectorAll('section[id]')];
  return {images: imgs, sections: secs.map(s => s.id),
    offsets: Object.fromEntries(secs.map(s => [s.id, s.getBoundingClientRect().top + window.scrollY])),
    title: document.title, height: document.documentElement.scrollHeight};
})()"""


def load(
    binary: str,
    url: str,
    screenshot: Path | None = None,
    width: int = 1400,
    full_page: bool = True,
    clip_height: int | None = None,
) -> PageLoad:
    """Opens `url`, waits for its load event and probes it; saves a PNG screenshot if asked."""
    out = PageLoad()
    with Browser(binary) as b:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=s)
        b.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        b.send("Page.navigate", {"url": url}, session=s)
        b.wait_for("Page.loadEventFired")
        res = b.send("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session=s)
        probe = res["result"]["value"]
        out.images, out.section_ids = probe["images"], probe["sections"]
        out.section_tops = probe["offsets"]
        out.title, out.height = probe["title"], int(probe["height"])
        if screenshot is not None:
            h = out.height if full_page else 900
            if clip_height:
                h = min(h, clip_height)
            b.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False},
                session=s,
            )
            shot = b.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1},
                    "captureBeyondViewport": True,
                },
                session=s,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        b.send("Runtime.evaluate", {"expression": "1"}, session=s)  # flush pending events
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.console_errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.console_errors.append(f"{entry.get('text')} {entry.get('url', '')}")
            elif m == "Runtime.exceptionThrown":
                out.exceptions.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Network.requestWillBeSent":
                out.requests.append(p["request"]["url"])
            elif m == "Network.loadingFailed":
                out.failed_requests.append(f"{p.get('errorText')} (request {p.get('requestId')})")
    return out


if __name__ == "__main__":  # python tests/browser.py PAGE.html OUT.png [WIDTH] [HEIGHT]
    import sys

    page, shot = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    w = int(sys.argv[3]) if len(sys.argv) > 3 else 1400
    h = int(sys.argv[4]) if len(sys.argv) > 4 else None
    r = load(find_browser(), page.as_uri(), shot, width=w, clip_height=h)
    print(
        json.dumps(
            {
                "height": r.height,
                "images": len(r.images),
                "broken": [i for i in r.images if not i["naturalWidth"]],
                "console_errors": r.console_errors,
                "exceptions": r.exceptions,
                "failed": r.failed_requests,
                "sections": r.section_tops,
            },
            indent=1,
        )
    )
