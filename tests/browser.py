"""Headless Chromium driven over the DevTools protocol on a pipe (no extra package): open a
page, wait until it says it is drawn, take the screenshot of that state.

`chromium --screenshot` takes its picture when a virtual-time budget runs out, whether or not
the viewer's tiles have arrived: 1 run in 10 caught a half-drawn viewer or one without its
overlay. Here the picture is taken once the page sets `document.body.dataset.ready`."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

import cv2
import numpy as np

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe", "--window-size=1200,800",
]  # fmt: skip


def available() -> bool:
    return shutil.which("chromium") is not None


class Chromium:
    """One headless browser (its own profile) and one page, for `with Chromium() as b:`."""

    def __init__(self, profile: str | None = None):
        self.profile = profile or tempfile.mkdtemp()
        self._id = 0
        self._buf = b""

    def __enter__(self) -> Chromium:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds():  # the protocol's pipe: the browser reads fd 3 and writes fd 4
            read, write = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w))
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.proc = subprocess.Popen(
            ["chromium", *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds,  # 3 and 4 survive the close of the other fds
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child_r)
        os.close(from_child_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to_child)
        os.close(self._from_child)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the protocol pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(
        self, url: str, ready: str = "document.body && document.body.dataset.ready", timeout: float = 90
    ):
        """Navigate and wait until `ready` is truthy; returns its value (None on timeout)."""
        self.page("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(f"document.readyState === 'complete' && ({ready})")
            if value:
                return value
            time.sleep(0.1)
        return None

    def screenshot(self) -> np.ndarray:
        """The page as it is now, RGB."""
        data = base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")


def viewer_frame_checks(img: np.ndarray, width: int = 890) -> dict:
    """What a drawn viewer shows in its left `width` px: the share of pixels still the viewer's
    empty background (#222), and the share in the jet overlay's strong blues and reds."""
    view = img[:, :width].astype(int)
    background = (np.abs(view - 34).max(-1) <= 3).mean()
    blue_red = ((view[..., 2] - view[..., 0] > 60) | (view[..., 0] - view[..., 2] > 60)).mean()
    return {"unpainted": float(background), "overlay": float(blue_red)}
