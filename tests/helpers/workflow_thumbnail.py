"""Draws a template's thumbnail (`workflows/<name>.jpg`, 512²): its title, groups, nodes and links, readable at a
glance — the frontend shows it in the template browser.

    python -m tests.helpers.workflow_thumbnail workflows/imtalker_face_restore.json "talking photo, face restored"
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 512
LINK_COLORS = {"IMAGE": "#64b5f6", "AUDIO": "#ea80fc", "FLOAT": "#aed581", "IMTALKER_MOTION": "#ffb74d",
               "IMTALKER_CONTROLS": "#4dd0e1", "IMTALKER_IDENTITY": "#f06292", "VIDEO": "#ff8a65"}


def _font(size: int, bold: bool = False):
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", ""):
        try:
            return ImageFont.truetype(str(Path(folder) / name) if folder else name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _label(node: dict) -> str:
    if node.get("title"):
        return node["title"].split(" (")[0]
    if node["type"] == "MarkdownNote":
        return "Note"
    name = node["type"].removeprefix("IMTalker")
    words, word = [], ""
    for char in name:
        if char.isupper() and word and not word[-1].isupper():
            words.append(word)
            word = ""
        word += char
    return " ".join(words + [word]).replace("Image Upscale With Model", "Upscale Image")


def draw(workflow: dict, title: str) -> Image.Image:
    nodes = workflow["nodes"]
    boxes = [g["bounding"] for g in workflow.get("groups", [])] + [[*n["pos"], *n["size"]] for n in nodes]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    top = 80
    scale = min((SIZE - 32) / (x1 - x0), (SIZE - top - 16) / (y1 - y0))

    def at(x, y):
        return 16 + (x - x0) * scale, top + (y - y0) * scale

    image = Image.new("RGB", (SIZE, SIZE), "#1e1f22")
    pen = ImageDraw.Draw(image)
    pen.text((16, 14), title, fill="white", font=_font(18, bold=True))
    pen.text((16, 42), "ComfyUI-IMTalker template", fill="#9aa0a6", font=_font(13))
    for group in workflow.get("groups", []):
        gx, gy, gw, gh = group["bounding"]
        (ax, ay), (bx, by) = at(gx, gy), at(gx + gw, gy + gh)
        pen.rounded_rectangle((ax, ay, bx, by), 5, fill=_mix(group["color"], 0.35), outline=group["color"], width=2)
        pen.text((ax + 5, ay + 3), group["title"], fill="white", font=_font(11, bold=True))
    by_id = {n["id"]: n for n in nodes}
    for link in workflow["links"]:
        _, src, src_slot, dst, dst_slot, kind = link[:6]
        a, b = by_id[src], by_id[dst]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * src_slot)
        end = at(b["pos"][0], b["pos"][1] + 30 + 20 * dst_slot)
        pen.line(_curve(start, end), fill=LINK_COLORS.get(kind, "#b0bec5"), width=1)
    for node in nodes:
        (ax, ay), (bx, by) = at(*node["pos"]), at(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        note = node["type"] == "MarkdownNote"
        pen.rounded_rectangle((ax, ay - 12, bx, by), 4, fill="#5b4a2e" if note else "#353535", outline="#111111")
        pen.rectangle((ax + 1, ay - 11, bx - 1, ay + 4), fill="#4a3b22" if note else "#2a2a2a")
        pen.text((ax + 5, ay - 10), _label(node), fill="#e8e8e8", font=_font(10))
    return image


def _mix(color: str, amount: float) -> tuple[int, int, int]:
    color = color.lstrip("#")
    if len(color) == 3:
        color = "".join(c * 2 for c in color)
    rgb = [int(color[i:i + 2], 16) for i in (0, 2, 4)]
    return tuple(int(30 + (c - 30) * amount) for c in rgb)


def _curve(start, end, steps: int = 24):
    (ax, ay), (bx, by) = start, end
    bend = max(abs(bx - ax) * 0.5, 20)
    points = []
    for i in range(steps + 1):
        t = i / steps
        x = (1 - t) ** 3 * ax + 3 * (1 - t) ** 2 * t * (ax + bend) + 3 * (1 - t) * t ** 2 * (bx - bend) + t ** 3 * bx
        y = (1 - t) ** 3 * ay + 3 * (1 - t) ** 2 * t * ay + 3 * (1 - t) * t ** 2 * by + t ** 3 * by
        points.append((x, y))
    return points


def main(path: str, title: str) -> None:
    workflow_path = Path(path)
    draw(json.loads(workflow_path.read_text()), title).save(workflow_path.with_suffix(".jpg"), quality=85)


if __name__ == "__main__":
    main(*sys.argv[1:3])
