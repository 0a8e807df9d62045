"""A real headless Chromium (Debian's package, which scripts/setup.sh installs) that renders a page.

``render`` loads a local HTML file with the network shut off: a page that needed anything from the
network or a script would render differently, and the DOM Chromium returns is what a person sees.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Where Debian puts it; a PATH lookup finds other installs.
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Without the background-networking flags Chromium's own connections are refused on a closed
# network, many at a time; --host-resolver-rules keeps the page itself from reaching any host.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def chromium() -> str | None:
    """The Chromium binary, or None where none is installed."""
    for candidate in CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def render(page: Path, *, screenshot: Path | None = None, width: int = 1100, height: int = 2400) -> str:
    """The DOM of ``page`` after Chromium rendered it; with ``screenshot``, also a PNG of it."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("no Chromium found: run bash scripts/setup.sh (it installs Debian's chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        base = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        url = page.resolve().as_uri()
        dom = subprocess.run(
            [*base, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        if screenshot is not None:
            subprocess.run(
                [*base, f"--screenshot={screenshot.resolve()}", url],
                capture_output=True,
                timeout=60,
                check=True,
            )
    return dom
