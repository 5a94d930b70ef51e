"""The last sample of a pipeline with its result drawn on it, as a JPEG; and a segmentation
model's class map as a small PNG (`render_mask`)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255))
_KEYPOINT_SEEN = 0.3  # keypoints below this score are not drawn
_SKELETON = (
    ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"),
    ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"),
    ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"),
    ("left_hip", "right_hip"),
    ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"),
    ("right_knee", "right_ankle"),
)


def render_snapshot(data: np.ndarray, result: dict[str, Any], *, quality: int = 85) -> bytes:
    """JPEG bytes: an image with detection boxes and class labels drawn on it, or a
    sensor window drawn as one line per channel with its anomaly score."""
    picture = _image(data) if data.ndim == 3 else _plot(data)
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for i, detection in enumerate(result.get("detections", [])):
        x0, y0, x1, y1 = detection["box"]
        colour = (
            _COLOURS[detection["index"] % len(_COLOURS)]
            if "index" in detection
            else _COLOURS[i % 5]
        )
        draw.rectangle((x0 * width, y0 * height, x1 * width, y1 * height), outline=colour, width=2)
        label = f"{detection.get('label') or detection.get('index')} {detection['score']:.2f}"
        draw.text((x0 * width + 3, max(0, y0 * height - 12)), label, fill=colour)
    for pose in result.get("poses", []):
        points = {
            k["name"]: (k["x"] * width, k["y"] * height)
            for k in pose["keypoints"]
            if k["score"] >= _KEYPOINT_SEEN
        }
        for a, b in _SKELETON:
            if a in points and b in points:
                draw.line((points[a], points[b]), fill=(0, 255, 255), width=2)
        for x, y in points.values():
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 0, 255))
    lines = [
        f"{c.get('label') or c['index']}: "
        + (f"{c['fraction']:.0%}" if "fraction" in c else f"{c['score']:.2f}")
        for c in result.get("classes", [])
    ]
    if "score" in result:
        verdict = "ANOMALY" if result.get("anomaly") else "normal"
        lines.append(f"score {result['score']:.3f} ({verdict})")
    for row, text in enumerate(lines):
        draw.text((5, 5 + 12 * row), text, fill=(255, 255, 0))
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _image(data: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(data, dtype=np.uint8), mode="RGB")


def _plot(window: np.ndarray, width: int = 640, height: int = 240) -> Image.Image:
    picture = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(picture)
    samples = np.asarray(window, dtype=np.float32).reshape(len(window), -1)
    low, high = float(samples.min()), float(samples.max())
    span = high - low or 1.0
    xs = np.linspace(0, width - 1, len(samples))
    for channel in range(samples.shape[1]):
        ys = height - 1 - (samples[:, channel] - low) / span * (height - 1)
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=_COLOURS[channel % 5])
    return picture


def render_mask(mask: np.ndarray) -> bytes:
    """PNG bytes of a class map (one class index per pixel, at the model's resolution): a
    palette image whose pixel values are the class indices, so it can be read back as
    data, with a distinct colour per class for people."""
    picture = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    palette = [0, 0, 0]
    for index in range(1, 256):
        palette += list(_COLOURS[(index - 1) % len(_COLOURS)])
    picture.putpalette(palette)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=True)
    return out.getvalue()
