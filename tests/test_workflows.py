"""The example workflows in workflows/ (ComfyUI UI format) are loadable and wired correctly.

Core node definitions are copied from ComfyUI 0.3.64 (commit a125cd84) in the shape of its
`/object_info` (the source files are named beside each); the pack's own come from INPUT_TYPES.
`ui_to_api` converts a UI workflow into the API prompt the frontend would queue; the end-to-end
test (test_comfy_e2e.py) uses it and checks the core table against a live server.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from tests.test_nodes import PACK_NAME, load_pack

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


# The frontend's Comfy.UploadImage extension gives a combo with one of these an upload button: a widget of
# its own, added after the node's required inputs, whose value ("image") is saved in widgets_values.
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


def is_upload_combo(spec) -> bool:
    """A file list with an upload button: its options are whatever is in the input folder."""
    return is_widget(spec) and len(spec) > 1 and any(spec[1].get(key) for key in (*MEDIA_UPLOAD_OPTIONS,
                                                                                  "audio_upload"))


def has_media_upload_button(definition: dict) -> bool:
    return any(spec[1].get(key) for _, spec in widget_inputs(definition) if len(spec) > 1
               for key in MEDIA_UPLOAD_OPTIONS)


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


def test_there_are_the_example_workflows():
    assert [p.name for p in WORKFLOWS] == [
        "imtalker_audio_portrait.json", "imtalker_blend_audio_video.json", "imtalker_face_restore.json",
        "imtalker_head_turn_keyframes.json", "imtalker_long_audio_streaming.json", "imtalker_one_node.json",
        "imtalker_photo_pasteback_upscale.json", "imtalker_pose_gaze_from_video.json",
        "imtalker_video_reenactment.json"]


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
            elif is_upload_combo(spec):
                pass  # the files in this machine's input folder; test_workflow_inputs_are_the_packs_examples
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
    assert not any(v["class_type"] in FRONTEND_ONLY for v in prompt.values())


def linked_from(prompt: dict, entry: dict, name: str) -> tuple[str, int]:
    """(class_type, output slot) of the node that feeds input `name` of a prompt entry."""
    source, slot = entry["inputs"][name]
    return prompt[source]["class_type"], slot


def test_audio_portrait_workflow_streams_into_an_mp4(defs):
    """Render To Video encodes the frames as they are rendered: no IMAGE batch of every frame is kept."""
    workflow = json.loads((ROOT / "workflows" / "imtalker_audio_portrait.json").read_text())
    prompt = ui_to_api(workflow, defs)
    assert sorted(v["class_type"] for v in prompt.values()) == [
        "IMTalkerAudioToMotion", "IMTalkerCropFace", "IMTalkerEncodeIdentity", "IMTalkerLoadGenerator",
        "IMTalkerLoadRenderer", "IMTalkerRenderToVideo", "LoadAudio", "LoadImage"]
    video = next(v for v in prompt.values() if v["class_type"] == "IMTalkerRenderToVideo")
    assert linked_from(prompt, video, "motion") == ("IMTalkerAudioToMotion", 0)
    assert linked_from(prompt, video, "audio") == ("IMTalkerAudioToMotion", 1)  # the speech, muxed
    assert linked_from(prompt, video, "identity") == ("IMTalkerEncodeIdentity", 0)
    assert {k: v for k, v in video["inputs"].items() if not isinstance(v, list)} == {
        "filename_prefix": "IMTalker/portrait", "batch_size": 0, "feather": 0.1}  # batch_size 0 = auto
    assert not {"crop", "original"} & set(video["inputs"])  # the face crop itself, as before: no paste-back


def test_video_reenactment_workflow_reads_and_writes_the_video_streaming(defs):
    """Video To Motion reads the driving file frame by frame and Render To Video encodes as it renders, in place
    of Load Video → Get Video Components → Crop Face → Encode Motion → Render → Create Video → Save Video."""
    workflow = json.loads((ROOT / "workflows" / "imtalker_video_reenactment.json").read_text())
    prompt = ui_to_api(workflow, defs)
    assert sorted(v["class_type"] for v in prompt.values()) == [
        "IMTalkerCropFace", "IMTalkerEncodeIdentity", "IMTalkerLoadRenderer", "IMTalkerRenderToVideo",
        "IMTalkerVideoToMotion", "LoadImage"]
    motion = next(v for v in prompt.values() if v["class_type"] == "IMTalkerVideoToMotion")
    assert {k: v for k, v in motion["inputs"].items() if not isinstance(v, list)} == {
        "video": "imtalker_examples/driving_short.mp4", "video_path": "", "crop": "face", "scale": 1.6,
        "batch_size": 0, "on_bad_frame": "hold", "max_frames": 0}
    node = next(n for n in workflow["nodes"] if n["type"] == "IMTalkerVideoToMotion")
    assert node["widgets_values"][-1] == "image"  # the upload button's value comes last, as on core Load Video
    video = next(v for v in prompt.values() if v["class_type"] == "IMTalkerRenderToVideo")
    assert linked_from(prompt, video, "motion") == ("IMTalkerVideoToMotion", 0)
    assert linked_from(prompt, video, "audio") == ("IMTalkerVideoToMotion", 1)  # the driving video's sound
    assert linked_from(prompt, video, "identity") == ("IMTalkerEncodeIdentity", 0)
    assert {k: v for k, v in video["inputs"].items() if not isinstance(v, list)} == {
        "filename_prefix": "IMTalker/reenactment", "batch_size": 0, "feather": 0.1}
    assert not {"crop", "original"} & set(video["inputs"])  # the portrait's face crop, as before: no paste-back


# Need the frames as an IMAGE batch: the upscaler or face restorer runs on them before Paste Back and Create Video.
IMAGE_BATCH_WORKFLOWS = {"imtalker_photo_pasteback_upscale.json", "imtalker_face_restore.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflows_stream_unless_they_need_the_frames(path, defs):
    """Render → Create Video holds every frame in memory (3 MiB per 512² frame, and ComfyUI caches it after
    the run); the templates stream with Render To Video / Talking Head unless the frames are processed."""
    types = {v["class_type"] for v in ui_to_api(json.loads(path.read_text()), defs).values()}
    if path.name in IMAGE_BATCH_WORKFLOWS:
        assert {"IMTalkerRender", "CreateVideo"} <= types
    else:
        assert not {"IMTalkerRender", "CreateVideo"} & types, path.name
        assert not {"LoadVideo", "GetVideoComponents"} & types, path.name  # Video To Motion reads the file


def test_widget_values_match_the_widgets_of_our_nodes(defs):
    """Every IMTalker node carries one value per widget (plus the seed's control value), in order: all
    required widgets, and no more values than widgets (trailing optional ones may be left to their
    defaults, as the frontend does for a workflow saved before they existed)."""
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if not node["type"].startswith("IMTalker"):
                continue
            definition = defs[node["type"]]
            widgets = widget_inputs(definition)
            slots = [len(widgets[:i]) + sum(adds_control_widget(n, s) for n, s in widgets[:i])
                     for i in range(len(widgets) + 1)]  # values taken by the first i widgets
            required = sum(1 for name, _ in widgets if name in definition["input"]["required"])
            count = len(node.get("widgets_values") or [])
            if has_media_upload_button(definition):  # the button's value follows every input's (all required)
                assert count == slots[-1] + 1, f"{path.name} node {node['id']}: {count} values for {slots} + upload"
                continue
            assert count in slots[required:], f"{path.name} node {node['id']}: {count} values for {slots}"


def test_one_node_workflow_uses_talking_head(defs):
    workflow = json.loads((ROOT / "workflows" / "imtalker_one_node.json").read_text())
    prompt = ui_to_api(workflow, defs)
    assert sorted(v["class_type"] for v in prompt.values()) == [
        "IMTalkerLoadGenerator", "IMTalkerLoadRenderer", "IMTalkerTalkingHead", "LoadAudio", "LoadImage"]
    head = next(v["inputs"] for v in prompt.values() if v["class_type"] == "IMTalkerTalkingHead")
    assert {k: v for k, v in head.items() if not isinstance(v, list)} == {
        "seed": 42, "steps": 10, "cfg_scale": 3, "noise": "reference", "crop": True, "batch_size": 4,
        "output": "mp4", "filename_prefix": "IMTalker/talking_head"}
    assert {k for k, v in head.items() if isinstance(v, list)} == {"renderer", "generator", "image", "audio"}


# ------------------------------------------------------------------------------------------------
# Example inputs: every template loads files the pack installs into input/imtalker_examples/
# ------------------------------------------------------------------------------------------------

LOADERS = {"LoadImage", "LoadAudio", "LoadVideo"}
# Our nodes that pick a file of the input folder with their first widget.
FILE_READERS = LOADERS | {"IMTalkerVideoToMotion", "IMTalkerPoseGazeFromVideoFile"}
EXAMPLE_INPUTS = ROOT / "example_inputs"


def examples_module():
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.examples")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_inputs_are_the_packs_examples(path):
    examples = examples_module()
    loaders = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in FILE_READERS]
    assert loaders, f"{path.name} loads no input"
    for node in loaders:
        value = node["widgets_values"][0]
        subfolder, _, name = value.partition("/")
        assert subfolder == examples.SUBFOLDER and name in examples.FILES, f"{path.name}: {value}"
        assert value == examples.widget_value(name) and (EXAMPLE_INPUTS / name).is_file(), value


def test_example_inputs_are_the_test_media_and_small():
    """Byte-identical to tests/data/media (so git stores each once), and nothing else is shipped."""
    examples = examples_module()
    shipped = sorted(p.name for p in EXAMPLE_INPUTS.iterdir() if p.name != "README.md")
    assert shipped == sorted(examples.FILES)
    for name in examples.FILES:
        assert (EXAMPLE_INPUTS / name).read_bytes() == (ROOT / "tests" / "data" / "media" / name).read_bytes(), name
    assert sum((EXAMPLE_INPUTS / name).stat().st_size for name in examples.FILES) < 2_000_000


def test_no_folder_hides_the_templates():
    """ComfyUI mounts each of these folders of a pack at /api/workflow_templates/<pack>/, in this order, and
    the first one present answers every request (app/custom_node_manager.py): any of them besides
    workflows/ would make the templates 404."""
    for name in ("example_workflows", "example", "examples", "workflow"):
        assert not (ROOT / name).exists(), f"{name}/ would shadow workflows/ in ComfyUI's template route"


def test_install_examples_copies_missing_files_and_keeps_the_users(tmp_path, caplog):
    examples = examples_module()
    target = tmp_path / "input" / examples.SUBFOLDER
    target.mkdir(parents=True)
    (target / "photo_512.png").write_bytes(b"the user's own file")
    with caplog.at_level(logging.INFO):
        copied = examples.install_examples(tmp_path / "input")
    assert copied == ["speech_16k_mono.wav", "driving_short.mp4"]
    assert (target / "photo_512.png").read_bytes() == b"the user's own file"
    for name in copied:
        assert (target / name).read_bytes() == (EXAMPLE_INPUTS / name).read_bytes()
    assert len([r for r in caplog.records if "example inputs" in r.getMessage()]) == 1
    caplog.clear()
    assert examples.install_examples(tmp_path / "input") == []  # a second start copies nothing
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert examples.install_examples(None) == []  # standalone: no input folder


def test_install_examples_never_fails_the_pack(tmp_path, caplog, monkeypatch):
    examples = examples_module()
    not_a_folder = tmp_path / "input"
    not_a_folder.write_text("a file where the input folder should be")
    with caplog.at_level(logging.WARNING):
        assert examples.install_examples(not_a_folder) == []
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "could not copy the example inputs" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a pack installed without its example files
        assert examples.install_examples(tmp_path / "other", source_dir=tmp_path / "missing") == []
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not list((tmp_path / "other" / examples.SUBFOLDER).iterdir())  # no empty or partial file left

    def disk_full(source, destination):
        destination.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(examples.shutil, "copyfileobj", disk_full)
    assert examples.install_examples(tmp_path / "full") == []
    assert not list((tmp_path / "full" / examples.SUBFOLDER).iterdir())  # the partial copy was removed


def test_pack_load_inside_comfyui_installs_the_examples(tmp_path, monkeypatch):
    """Loading the pack in a (stand-in) ComfyUI copies the examples into its input folder."""
    from tests.test_nodes import FakeComfy

    fake = FakeComfy(tmp_path / "models", tmp_path / "output")
    fake.modules["folder_paths"].get_input_directory = lambda: str(tmp_path / "input")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    name = "imtalker_pack_in_stand_in_comfyui"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert "IMTalkerTalkingHead" in module.NODE_CLASS_MAPPINGS
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    installed = tmp_path / "input" / "imtalker_examples"
    assert sorted(p.name for p in installed.iterdir()) == sorted(examples_module().FILES)


# ------------------------------------------------------------------------------------------------
# Layout: grouped, compact, readable at the default zoom; a thumbnail per template
# ------------------------------------------------------------------------------------------------

NODE_TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its `pos`
MAX_WIDTH, MAX_HEIGHT = 1600, 1300
GROUP_OF = {"Models": lambda t: t.startswith("IMTalkerLoad") or t.endswith("ModelLoader"),
            "Inputs": lambda t: t in FILE_READERS,
            "Output": lambda t: t in ("SaveVideo", "PreviewAny", "CreateVideo", "IMTalkerRenderToVideo")}


def node_box(node) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node including its title bar."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - NODE_TITLE_HEIGHT, x + w, y + h


def group_box(group) -> tuple[float, float, float, float]:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_grouped_and_compact(path):
    workflow = json.loads(path.read_text())
    groups = workflow.get("groups") or []
    titles = [g["title"] for g in groups]
    assert {"Models", "Inputs", "Generate"} <= set(titles) <= {"Models", "Inputs", "Controls", "Generate", "Motion",
                                                                "Output"}, titles
    assert len(titles) == len(set(titles))
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            assert not overlap(group_box(groups[a]), group_box(groups[b])), (titles[a], titles[b])
    boxes = {n["id"]: node_box(n) for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        box = boxes[node["id"]]
        touching = [g["title"] for g in groups if overlap(box, group_box(g))]
        where = f"{path.name} node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY and not touching:
            continue  # the note may sit outside the groups
        # Inside exactly one group, entirely (LiteGraph moves a group's nodes with it, judged by position).
        assert len(touching) == 1, f"{where} touches groups {touching}"
        (group,) = [g for g in groups if g["title"] == touching[0]]
        assert inside(box, group_box(group)), f"{where} sticks out of group {group['title']}"
        for title, belongs in GROUP_OF.items():
            if belongs(node["type"]):
                assert group["title"] == title, f"{where} is in {group['title']}, not {title}"
        for other, other_box in boxes.items():
            assert other == node["id"] or not overlap(box, other_box), f"{where} overlaps node {other}"
    every = list(boxes.values()) + [group_box(g) for g in groups]
    width = max(b[2] for b in every) - min(b[0] for b in every)
    height = max(b[3] for b in every) - min(b[1] for b in every)
    assert width <= MAX_WIDTH and height <= MAX_HEIGHT, f"{path.name} is {width}x{height} px"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_a_thumbnail(path):
    """The frontend shows `/api/workflow_templates/<pack>/<name>.jpg` for a custom node's template."""
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"no thumbnail {thumbnail.name}"
    assert thumbnail.stat().st_size < 64_000
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and 256 <= min(image.size) and max(image.size) <= 1024
    assert sorted(p.stem for p in path.parent.glob("*.jpg")) == [p.stem for p in WORKFLOWS]  # none left over
