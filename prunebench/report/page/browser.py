"""The report page in a real headless Chromium: its DOM after its scripts ran, its self-test and a
screenshot. Opened with `#selftest` in the URL, the page exercises its own JS and writes the
outcome into the DOM (page.js): that is how the headless-browser test (and `screenshot`, which
reads the page height from it) looks inside without a driver library.

python -m prunebench.report.page.browser [index.html [index.png]]: screenshot the page.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from prunebench.report.html import HTML_NAME

SCREENSHOT_NAME = "index.png"
SCREENSHOT_WIDTH = 1280
# Chromium refuses (or renders blank) beyond roughly this many pixels in one capture.
MAX_SCREENSHOT_HEIGHT = 16000
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ENV = "PRUNEBENCH_CHROMIUM"


class ChromiumError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$PRUNEBENCH_CHROMIUM, else the first Chromium / Chrome binary on PATH, else None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _console_messages(stderr: str) -> list[str]:
    """Chromium's --enable-logging lines for the page's console (any level): `...:CONSOLE...] "msg", source: ...`."""
    return [line.split("] ", 1)[-1] for line in stderr.splitlines() if ":CONSOLE" in line]


def _run_chromium(html_path: str | os.PathLike, fragment: str, extra: Sequence[str],
                  chromium: str | None, timeout: float, budget_ms: int) -> subprocess.CompletedProcess:
    binary = chromium or find_chromium()
    if not binary:
        raise ChromiumError("no chromium binary found (install Debian's `chromium`, or set "
                            f"{CHROMIUM_ENV})")
    url = Path(html_path).resolve().as_uri() + fragment
    # A private profile per run: concurrent runs do not fight over one profile lock, and nothing
    # is left in the user's ~/.config.
    with tempfile.TemporaryDirectory(prefix="prunebench-chromium-") as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                   "--v=0", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise ChromiumError(f"{' '.join(command)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result


def dump_dom(html_path: str | os.PathLike, fragment: str = "", *, width: int = SCREENSHOT_WIDTH,
             chromium: str | None = None, timeout: float = 120,
             budget_ms: int = 5000) -> tuple[str, list[str]]:
    """Load the page in headless Chromium at `width` pixels; return (the DOM after its scripts ran,
    console messages)."""
    result = _run_chromium(html_path, fragment, ["--dump-dom", f"--window-size={width},900"],
                           chromium, timeout, budget_ms)
    return result.stdout, _console_messages(result.stderr)


def selftest(html_path: str | os.PathLike, **kwargs) -> tuple[dict, str, list[str]]:
    """Open the page with #selftest: (the JSON its JS wrote, the DOM, console messages)."""
    dom, console = dump_dom(html_path, "#selftest", **kwargs)
    match = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    if not match:
        raise ChromiumError("the page wrote no #selftest result (did its script run?)")
    return json.loads(html.unescape(match.group(1))), dom, console


def screenshot(html_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = SCREENSHOT_WIDTH,
               height: int | None = None, chromium: str | None = None, timeout: float = 120) -> Path:
    """A PNG of the whole page (height measured by the page itself unless given)."""
    if height is None:
        result, _, _ = selftest(html_path, width=width, chromium=chromium, timeout=timeout)
        height = int(result.get("page_height") or 2000)
    height = max(200, min(int(height), MAX_SCREENSHOT_HEIGHT))
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(html_path, "", [f"--window-size={width},{height}", f"--screenshot={png}"],
                  chromium, timeout, 5000)
    if not png.is_file() or png.stat().st_size == 0:
        raise ChromiumError(f"chromium wrote no screenshot at {png}")
    return png


def main(argv: Sequence[str] | None = None) -> int:
    """Screenshot the page: index.html (default results/report/index.html) -> index.png beside it."""
    args = list(sys.argv[1:] if argv is None else argv)
    page = Path(args[0]) if args else Path("results") / "report" / HTML_NAME
    png = Path(args[1]) if len(args) > 1 else page.with_name(SCREENSHOT_NAME)
    try:
        print(screenshot(page, png))
    except (ChromiumError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
