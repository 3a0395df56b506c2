"""The example workflows in workflows/ (ComfyUI UI format) are loadable and wired correctly.

Core node definitions are copied from ComfyUI 0.3.64 (commit a125cd84) in the shape of its
`/object_info` (the source files are named beside each); the pack's own come from INPUT_TYPES.
`ui_to_api` converts a UI workflow into the API prompt the frontend would queue; the end-to-end
test (test_comfy_e2e.py) uses it and checks the core table against a live server.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_nodes import load_pack

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes that exist only in the frontend and never reach the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# The official file names the workflows select, so they run once the official files are in place.
OFFICIAL_MODEL_VALUES = {"renderer_name": "renderer.ckpt", "generator_name": "generator.ckpt",
                         "wav2vec2_folder": "wav2vec2-base-960h"}


def _node(required, outputs, output_names=None, optional=None):
    required, optional = dict(required), dict(optional or {})
    return {"input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": list(outputs), "output_name": list(output_names or outputs)}


# Core nodes used by the workflows, as ComfyUI 0.3.64 defines them. Model/file dropdowns hold
# whatever is on disk, so their options are left empty here.
CORE_NODES = {
    # nodes.py: LoadImage
    "LoadImage": _node({"image": [[], {"image_upload": True}]}, ["IMAGE", "MASK"]),
    # comfy_extras/nodes_audio.py: LoadAudio
    "LoadAudio": _node({"audio": [[], {"audio_upload": True}]}, ["AUDIO"]),
    # comfy_extras/nodes_video.py: LoadVideo, GetVideoComponents, CreateVideo, SaveVideo
    "LoadVideo": _node({"file": ["COMBO", {"options": [], "video_upload": True}]}, ["VIDEO"]),
    "GetVideoComponents": _node({"video": ["VIDEO", {}]}, ["IMAGE", "AUDIO", "FLOAT"], ["images", "audio", "fps"]),
    "CreateVideo": _node({"images": ["IMAGE", {}], "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0,
                                                                     "step": 1.0}]},
                         ["VIDEO"], optional={"audio": ["AUDIO", {}]}),
    "SaveVideo": _node({"video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                        "format": ["COMBO", {"default": "auto", "options": ["auto", "mp4"]}],
                        "codec": ["COMBO", {"default": "auto", "options": ["auto", "h264"]}]}, []),
    # comfy_extras/nodes_upscale_model.py: UpscaleModelLoader, ImageUpscaleWithModel
    "UpscaleModelLoader": _node({"model_name": ["COMBO", {"options": []}]}, ["UPSCALE_MODEL"]),
    "ImageUpscaleWithModel": _node({"upscale_model": ["UPSCALE_MODEL", {}], "image": ["IMAGE", {}]}, ["IMAGE"]),
    # comfy_extras/nodes_preview_any.py: PreviewAny
    "PreviewAny": _node({"source": ["*", {}]}, []),
}


def pack_nodes() -> dict:
    """The pack's node definitions in /object_info shape."""
    pack = load_pack()
    out = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        out[node_id] = _node({k: list(v) for k, v in spec["required"].items()}, cls.RETURN_TYPES, cls.RETURN_NAMES,
                             {k: list(v) for k, v in spec.get("optional", {}).items()})
    return out


def definitions() -> dict:
    return {**CORE_NODES, **pack_nodes()}


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def input_spec(definition: dict, name: str):
    sections = definition["input"]
    return sections.get("required", {}).get(name) or sections.get("optional", {}).get(name)


def widget_inputs(definition: dict) -> list[tuple[str, list]]:
    """Widget inputs in the frontend's widget order: required then optional, as declared."""
    order = definition["input_order"]
    names = order.get("required", []) + order.get("optional", [])
    return [(name, input_spec(definition, name)) for name in names if is_widget(input_spec(definition, name))]


def adds_control_widget(name: str, spec) -> bool:
    """INT seeds get an extra frontend-only 'control after generate' value in widgets_values."""
    return spec[0] == "INT" and (spec[1].get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, defs: dict) -> dict:
    """The API prompt `{id: {class_type, inputs}}` the frontend makes of a UI workflow.

    widgets_values are matched to widget inputs in order (skipping control-after-generate values;
    upload widgets come last and are ignored); linked inputs become `[source id, output slot]`.
    Frontend-only and muted/bypassed nodes are left out.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        definition = defs[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in widget_inputs(definition):
            if not values:
                break
            inputs[name] = values.pop(0)
            if adds_control_widget(name, spec):
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def defs():
    return definitions()


def test_there_are_the_four_example_workflows():
    assert [p.name for p in WORKFLOWS] == [
        "imtalker_audio_portrait.json", "imtalker_long_audio_streaming.json",
        "imtalker_photo_pasteback_upscale.json", "imtalker_video_reenactment.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_known_nodes_and_is_ui_format(path, defs):
    workflow = json.loads(path.read_text())
    assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(workflow)
    ids = [n["id"] for n in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= workflow["last_node_id"]
    assert max(link[0] for link in workflow["links"]) <= workflow["last_link_id"]
    unknown = {n["type"] for n in workflow["nodes"]} - set(defs) - FRONTEND_ONLY
    assert not unknown, f"{path.name} uses node types that are neither core nor ours: {unknown}"
    assert any(n["type"].startswith("IMTalker") for n in workflow["nodes"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_links_match_both_ends(path, defs):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        source, target = nodes[src], nodes[dst]
        out_type = defs[source["type"]]["output"][src_slot]
        slot = target["inputs"][dst_slot]
        in_type = input_spec(defs[target["type"]], slot["name"])[0]
        where = f"{path.name} link {link_id}: {source['type']}[{src_slot}] → {target['type']}.{slot['name']}"
        assert link_type == out_type, where
        assert in_type in (out_type, "*"), f"{where}: {out_type} into {in_type}"
        assert link_id in source["outputs"][src_slot]["links"] and slot["link"] == link_id, where


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_inputs_are_connected_and_values_valid(path, defs):
    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, defs)
    for node_id, entry in prompt.items():
        definition = defs[entry["class_type"]]
        where = f"{path.name} node {node_id} ({entry['class_type']})"
        for name, spec in definition["input"]["required"].items():
            assert name in entry["inputs"], f"{where}: required input {name} is missing"
        for name, value in entry["inputs"].items():
            spec = input_spec(definition, name)
            assert spec is not None, f"{where}: unknown input {name}"
            if isinstance(value, list) and not is_widget(spec):
                continue  # a link, checked above
            if isinstance(value, list):
                continue  # a widget fed by a link (e.g. fps)
            kind, options = spec[0], spec[1]
            choices = kind if isinstance(kind, list) else options.get("options")
            if entry["class_type"].startswith("IMTalker") and name in OFFICIAL_MODEL_VALUES:
                assert value == OFFICIAL_MODEL_VALUES[name], where
            elif choices:
                assert value in choices, f"{where}: {name}={value!r} not in {choices}"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], f"{where}: {name}={value} out of range"
                if kind == "INT":
                    assert isinstance(value, int), where
            if kind == "BOOLEAN":
                assert isinstance(value, bool), where


def test_ui_to_api_skips_control_after_generate_value(defs):
    workflow = json.loads((ROOT / "workflows" / "imtalker_audio_portrait.json").read_text())
    prompt = ui_to_api(workflow, defs)
    motion = next(v for v in prompt.values() if v["class_type"] == "IMTalkerAudioToMotion")
    assert {k: motion["inputs"][k] for k in ("seed", "steps", "cfg_scale")} == {"seed": 42, "steps": 10,
                                                                              "cfg_scale": 3.0}
    video = next(v for v in prompt.values() if v["class_type"] == "CreateVideo")
    assert isinstance(video["inputs"]["fps"], list)  # the frame rate comes from Audio To Motion
    assert not any(v["class_type"] in FRONTEND_ONLY for v in prompt.values())
