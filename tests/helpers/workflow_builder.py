"""Builds UI-format workflows (what the frontend saves and loads) from a compact graph description.

The inverse of `tests.test_workflows.ui_to_api`, used to write the templates in `workflows/`:

    graph = {
        "image": Node("LoadImage", (780, 74), widgets={"image": "imtalker_examples/photo_512.png"}),
        "crop": Node("IMTalkerCropFace", (16, 560), links={"image": ("image", 0)}),
        ...
    }
    workflow = build(graph, definitions(), groups=[Group("Inputs", ("image",))], note=("# Title", (0, 30)))

Widgets left out take their default; widgets are written in the frontend's order (required then optional,
a seed's control-after-generate value after it, upload buttons last). `round_trip` in the tests checks that
`ui_to_api(build(graph))` gives back the graph.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from tests.test_workflows import (MEDIA_UPLOAD_OPTIONS, adds_control_widget, input_spec, is_upload_combo, is_widget,
                                  widget_inputs)

GROUP_COLORS = {"Models": "#3f789e", "Inputs": "#8A8", "Controls": "#2a8a8a", "Generate": "#b58b2a",
                "Motion": "#6a5acd", "Output": "#a1309b"}


@dataclass
class Node:
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name → (source node key, output slot)
    size: tuple[int, int] = (320, 0)  # height 0: estimated from the inputs
    title: str | None = None


@dataclass
class Group:
    title: str
    members: tuple[str, ...]


def _default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        return (options.get("options") or [None])[0]
    return None


def _widget_values(node: Node, definition: dict) -> list:
    values = []
    for name, spec in widget_inputs(definition):
        if name in node.links:
            values.append(_default(spec))
            continue
        values.append(node.widgets.get(name, _default(spec)))
        if adds_control_widget(name, spec):
            values.append("fixed")
    unknown = set(node.widgets) - {name for name, _ in widget_inputs(definition)}
    if unknown:
        raise ValueError(f"{node.type} has no widgets {sorted(unknown)}")
    if any(len(spec) > 1 and any(spec[1].get(k) for k in MEDIA_UPLOAD_OPTIONS) for _, spec in
           widget_inputs(definition)):
        values.append("image")
    elif any(is_upload_combo(spec) for _, spec in widget_inputs(definition)):
        values += [None, None]  # LoadAudio's audioUI and upload widgets
    return values


def build(graph: dict[str, Node], defs: dict, groups: list[Group] = (), note: tuple[str, tuple[int, int]] | None = None,
          name: str = "workflow") -> dict:
    ids = {key: index + 1 for index, key in enumerate(graph)}
    links, outputs = [], {key: {} for key in graph}
    nodes = []
    for key, node in graph.items():
        definition = defs[node.type]
        inputs = []
        order = definition["input_order"]
        for input_name in order.get("required", []) + order.get("optional", []):
            spec = input_spec(definition, input_name)
            entry = {"localized_name": input_name, "name": input_name,
                     "type": spec[0] if isinstance(spec[0], str) else "COMBO"}
            if input_name in order.get("optional", []) and not is_widget(spec):
                entry["shape"] = 7
            if is_widget(spec):
                entry["widget"] = {"name": input_name}
            source = node.links.get(input_name)
            entry["link"] = None
            if source is not None:
                link_id = len(links) + 1
                src_key, slot = source
                src_type = defs[graph[src_key].type]["output"][slot]
                links.append([link_id, ids[src_key], slot, ids[key], len(inputs), src_type])
                outputs[src_key].setdefault(slot, []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        unknown = set(node.links) - set(order.get("required", []) + order.get("optional", []))
        if unknown:
            raise ValueError(f"{node.type} has no inputs {sorted(unknown)}")
        height = node.size[1] or 60 + 26 * (len(widget_inputs(definition)) + len(definition["output"]))
        nodes.append({
            "id": ids[key], "type": node.type, "pos": list(node.pos), "size": [node.size[0], height], "flags": {},
            "order": len(nodes), "mode": 0, "inputs": inputs,
            "outputs": [{"localized_name": out_name, "name": out_name, "type": out_type, "slot_index": slot,
                         "links": []} for slot, (out_type, out_name) in
                        enumerate(zip(definition["output"], definition["output_name"]))],
            "properties": {"Node name for S&R": node.type}, "widgets_values": _widget_values(node, definition),
            **({"title": node.title} if node.title else {}),
        })
    for node_entry, key in zip(nodes, graph):
        for slot, link_ids in outputs[key].items():
            node_entry["outputs"][slot]["links"] = link_ids
    if note is not None:
        text, pos = note
        nodes.insert(0, {"id": len(graph) + 1, "type": "MarkdownNote", "pos": list(pos), "size": [340, 420],
                         "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    by_id = {n["id"]: n for n in nodes}
    group_entries = []
    for index, group in enumerate(groups):
        members = [by_id[ids[k]] for k in group.members]
        x0 = min(n["pos"][0] for n in members) - 16
        y0 = min(n["pos"][1] for n in members) - 74
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + 16
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + 16
        group_entries.append({"id": index + 1, "title": group.title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                              "color": GROUP_COLORS.get(group.title, "#3f789e"), "font_size": 24, "flags": {}})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "revision": 0, "last_node_id": len(nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": group_entries, "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}
