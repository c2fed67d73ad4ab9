"""Pictures and descriptions of the demo's synthetic scenes for the retrieval report (scripts/show_retrievals.py).

The demo folder stores no per-image description, so the scenes are drawn again from the MANIFEST's seed and
accepted only if they regenerate the split's captions.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import scenes as demo


def demo_scenes(root: str | Path, split: str, n_images: int, captions: Sequence[str]):
    """The generator's scenes of a demo split, or None when `root` is not (this version of) demo data.

    The demo folder stores no per-image description, so the scenes are drawn again from the MANIFEST's
    seed (`coder.demo.scenes.sample_scenes`) and accepted only if they regenerate the split's captions.
    """
    try:
        manifest = json.loads((Path(root) / demo.MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("version") != demo.DEMO_FORMAT_VERSION or split not in demo.SPLITS \
            or manifest.get(f"{split}_images", -1) < n_images:
        return None
    seed = int(manifest["seed"])
    scenes = demo.sample_scenes(seed, split, n_images)
    caption_rng = np.random.default_rng([seed, demo.SPLITS.index(split), 1])  # the generator's caption stream
    regenerated = demo.split_captions(caption_rng, scenes, split)
    if regenerated[:len(captions)] != list(captions):
        return None
    return scenes


def describe_scene(scene) -> str:
    """'small brown dog sitting, big black dog sitting, red small car · at the beach'."""
    parts = []
    for inst in scene.instances:
        text = f"{inst.size} {inst.colour} {inst.noun.concept}"
        if inst.noun == scene.subject.noun:
            text += f" {scene.action}"
        parts.append(text)
    return ", ".join(parts) + f" · place: {scene.place}"


_PLACE_FILL = {"beach": "#f3e2b3", "street": "#d4d4d4", "park": "#c4e6b8", "kitchen": "#f1e4d4",
               "field": "#dcefb8", "snow": "#f4f7fb", "room": "#eadfd2", "garden": "#c8e6c0",
               "lake": "#bcdcf0", "city": "#dadae4", "forest": "#a9cf9f", "market": "#f4d9b0"}
_COLOUR_FILL = {"golden": "#d4a017", "gray": "#8a8a8a", "silver": "#c0c0c0", "brown": "#8b5a2b",
                "yellow": "#f2d22e", "green": "#3c9a3c", "blue": "#3a6fd8", "red": "#d33b3b",
                "orange": "#f08a24", "pink": "#f29bc0", "black": "#222222", "white": "#ffffff"}


def scene_svg(scene, height: int = 72) -> str:
    """A small inline SVG of a demo scene: the place as the background, one disc per instance in its
    colour (bigger for big/old), its noun underneath, the subject's action on top."""
    width = 40 + 62 * len(scene.instances)  # room for each noun label
    items = [f'<rect width="{width}" height="{height}" rx="6" fill="{_PLACE_FILL.get(scene.place, "#eee")}"/>',
             f'<text x="6" y="12" font-size="10" fill="#555">{html.escape(scene.place)} · '
             f'{html.escape(scene.action)}</text>']
    step = width / (len(scene.instances) + 1)
    for n, inst in enumerate(scene.instances):
        x = step * (n + 1)
        r = 13 if inst.size in ("big", "old") else 9
        fill = _COLOUR_FILL.get(inst.colour, inst.colour)
        ring = ' stroke="#d00" stroke-width="2"' if inst.noun == scene.subject.noun else ' stroke="#555"'
        items.append(f'<circle cx="{x:.0f}" cy="36" r="{r}" fill="{fill}"{ring}/>')
        items.append(f'<text x="{x:.0f}" y="64" font-size="10" text-anchor="middle">'
                     f'{html.escape(inst.noun.concept)}</text>')
    return (f'<svg class="scene" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(describe_scene(scene))}">'
            + "".join(items) + "</svg>")


def scene_describer(root: str | Path, split: str, n_images: int,
                    captions: Sequence[str]) -> Callable[[int], tuple[str, str]] | None:
    """For `build_report(describe_images=...)`: image index -> (description, inline SVG) on demo data."""
    scenes = demo_scenes(root, split, n_images, captions)
    if scenes is None:
        return None
    return lambda i: (describe_scene(scenes[i]), scene_svg(scenes[i]))
