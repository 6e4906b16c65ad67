"""The README's pictures of the cards, taken from a real run in a headless browser.

    python flows/dolly_flow.py run                     # any finished DollyFlow run
    python benchmarks/card_pictures.py                 # its training and gpu_profile cards
    python benchmarks/card_pictures.py --run DollyFlow/1796040357853217 --out /tmp/pictures

Writes ``training-card.png`` and ``gpu-profile-card.png`` (default folder ``docs/images``): each
card's HTML, as ``card view`` opens it, rendered by Chromium offline (the cards inline their
charts). Needs a Chromium: ``apt-get install chromium`` (Debian) or ``CHROMIUM=/path/to/chrome``.
Run it where the run's Metaflow datastore is readable (the same folder and settings as the run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# card id on the train step -> picture name, browser window (width, height): the top of the card,
# which holds the curves and the evaluation table, or the per-device charts.
CARDS = {"training": ("training-card.png", (1200, 1500)), "gpu_profile": ("gpu-profile-card.png", (1200, 1100))}


def find_chromium() -> str:
    """The browser to use: ``$CHROMIUM``, else chromium or chromium-browser on PATH."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("error: no Chromium found: install it (Debian: apt-get install chromium) "
                         "or set CHROMIUM=/path/to/chrome.")
    return found


def chromium_flags(chromium: str, profile_dir: Path, window: tuple[int, int]) -> list[str]:
    """A headless Chromium that stays offline and on this machine (no first-run, sync, update
    or background requests), with a JavaScript budget for the card's own rendering; its console
    goes to stderr, where tests look for errors."""
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile_dir}", "--virtual-time-budget=5000",
            "--enable-logging=stderr", "--v=0", f"--window-size={window[0]},{window[1]}"]


def screenshot(html: Path, png: Path, window: tuple[int, int], *, chromium: str | None = None) -> None:
    """``html`` rendered into ``png`` (the top ``window`` of the page). Raises RuntimeError with
    the browser's output when it fails or writes a blank page."""
    chromium = chromium or find_chromium()
    with tempfile.TemporaryDirectory() as profile:
        shot = subprocess.run([*chromium_flags(chromium, Path(profile), window), f"--screenshot={png}", html.as_uri()],
                              capture_output=True, text=True, timeout=120)
    if shot.returncode != 0 or not png.is_file() or png.stat().st_size < 20_000:  # a blank page is a few KB
        raise RuntimeError(f"Chromium could not render {html}: {shot.stderr[-2000:]}")
    trim_blank_bottom(png)


def trim_blank_bottom(png: Path, margin: int = 24) -> None:
    """Cut the white space under the page's content: a short card (a CPU node's profile) in a
    window sized for a long one (a GPU node's) would otherwise be a mostly blank picture."""
    from PIL import Image, ImageChops

    with Image.open(png) as image:
        page = image.convert("RGB")
    content = ImageChops.difference(page, Image.new("RGB", page.size, (255, 255, 255))).getbbox()
    if content and content[3] + margin < page.height:
        page.crop((0, 0, page.width, content[3] + margin)).save(png)


def train_task(pathspec: str) -> object:
    """The train step's task (node 0's for a multi-node run) of ``pathspec`` (``DollyFlow/<id>``;
    ``latest``: DollyFlow's latest successful run)."""
    from metaflow import Flow, Run, namespace

    namespace(None)
    run = Flow("DollyFlow").latest_successful_run if pathspec == "latest" else Run(pathspec)
    if run is None:
        raise SystemExit("error: no successful DollyFlow run here: run `python flows/dolly_flow.py run` first, "
                         "or name one with --run DollyFlow/<id>.")
    return min(run["train"], key=lambda task: int(task.id))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest", help="DollyFlow/<id>, or latest (the latest successful run).")
    parser.add_argument("--out", default=str(REPO / "docs" / "images"), help="Folder for the PNGs.")
    args = parser.parse_args(argv)
    from metaflow.cards import get_cards

    chromium = find_chromium()
    task = train_task(args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for card_id, (name, window) in CARDS.items():
            cards = list(get_cards(task, id=card_id))
            if not cards:
                raise SystemExit(f"error: {task.pathspec} has no {card_id} card.")
            html = Path(work) / f"{card_id}.html"
            html.write_text(cards[-1].get())  # the last attempt's
            screenshot(html, out / name, window, chromium=chromium)
            print(f"{out / name}: the {card_id} card of {task.pathspec}")


if __name__ == "__main__":
    sys.exit(main())
