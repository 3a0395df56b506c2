"""The ComfyUI nodes without ComfyUI: definitions, the bridge's two modes, and each node run
in-process on stand-in weights and the media in tests/data/media.

The full-size renderer costs several seconds per 512² frame on a CPU, so rendering nodes draw one
frame and audio clips are cut to 0.1 s (3 frames). The pack is imported the way ComfyUI imports
it (a package from its folder, `nodes` resolved relatively), never as a top-level `nodes`.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "imtalker_pack_under_test"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CORE_WIRE_TYPES = {"IMAGE", "MASK", "AUDIO"}


def load_pack():
    """Import the repository as ComfyUI does: a package built from its folder's __init__.py."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def sub(pack):
    """`sub("nodes.face")` → the pack's module (same objects the nodes use)."""
    return lambda name: importlib.import_module(f"{PACK_NAME}.{name}")


@pytest.fixture(scope="module")
def env_dirs(standin_dir, tmp_path_factory):
    """Standalone mode's folders: models from the stand-in folder, outputs in a temp folder."""
    out = tmp_path_factory.mktemp("output")
    saved = {k: os.environ.get(k) for k in ("IMTALKER_MODELS", "IMTALKER_OUTPUT_DIR")}
    os.environ["IMTALKER_MODELS"] = str(standin_dir)
    os.environ["IMTALKER_OUTPUT_DIR"] = str(out)
    yield standin_dir, out
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def run(pack, node_id, **inputs):
    """Call a node's FUNCTION as ComfyUI does; returns the result tuple (ui part dropped)."""
    instance = node(pack, node_id)
    out = getattr(instance, instance.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def renderer(pack, env_dirs):
    (model,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="auto")
    return model


@pytest.fixture(scope="module")
def generator(pack, env_dirs):
    (models,) = run(pack, "IMTalkerLoadGenerator", generator_name="generator.ckpt",
                    wav2vec2_folder="wav2vec2-base-960h", precision="fp32", use_ema=False)
    return models


@pytest.fixture(scope="module")
def photo(sub, media_dir):
    """photo_512.png as a ComfyUI IMAGE [1, H, W, 3]."""
    return torch.from_numpy(sub("imtalker_core.media.images").load_image(media_dir / "photo_512.png"))[None]


@pytest.fixture(scope="module")
def cropped(pack, photo):
    return run(pack, "IMTalkerCropFace", image=photo, scale=1.6, on_no_face="center")


@pytest.fixture(scope="module")
def identity(pack, renderer, cropped):
    (value,) = run(pack, "IMTalkerEncodeIdentity", renderer=renderer, image=cropped[0])
    return value


def comfy_audio(path, seconds):
    """A ComfyUI AUDIO dict like LoadAudio's ([1, C, S] float32 at the file's rate), cut short."""
    import soundfile
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    data = data[: int(seconds * rate)].T
    return {"waveform": torch.from_numpy(np.ascontiguousarray(data))[None], "sample_rate": rate}


def driving_frames(sub, media_dir, count):
    frames = list(sub("imtalker_core.media.video").read_video(media_dir / "driving_short.mp4", max_frames=count))
    return torch.from_numpy(np.stack(frames)).float() / 255.0


# ------------------------------------------------------------------------------------------------
# Definitions
# ------------------------------------------------------------------------------------------------

def test_every_node_definition_is_well_formed(pack):
    assert pack.WEB_DIRECTORY is None
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("IMTalker") and node_id in pack.NODE_DISPLAY_NAME_MAPPINGS, node_id
        assert cls.CATEGORY.startswith("IMTalker") and cls.DESCRIPTION, node_id
        n_out = len(cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == n_out == len(cls.OUTPUT_TOOLTIPS), node_id
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"], node_id
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind, opts = entry
                where = f"{node_id}.{name}"
                assert opts.get("tooltip"), f"{where} has no tooltip"
                assert name in params, f"{where} is not a parameter of {cls.FUNCTION}"
                if section == "optional":
                    assert params[name].default is not inspect.Parameter.empty, f"{where} needs a default"
                if isinstance(kind, list):
                    assert "default" not in opts or opts["default"] in kind, where
                    continue
                assert kind in WIDGET_TYPES | CORE_WIRE_TYPES or kind.startswith("IMTALKER_"), where
                if kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], where
                    assert isinstance(opts["default"], int if kind == "INT" else float), where
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty and n != "self"}
        assert required <= set(spec["required"]), f"{node_id}: {required - set(spec['required'])} never given"


def test_pack_import_is_relative_and_light(pack):
    # ComfyUI's own `nodes` module must never be shadowed or imported by the pack.
    offenders = []
    for path in [ROOT / "__init__.py", *(ROOT / "nodes").glob("*.py")]:
        text = path.read_text()
        if re.search(r"^\s*(import nodes\b|from nodes\b)", text, re.M):
            offenders.append(path.name)
        if path.name != "bridge.py" and re.search(r"^\s*(import|from)\s+(comfy|folder_paths|comfy_api)\b", text, re.M):
            offenders.append(path.name + " imports ComfyUI outside bridge.py")
    assert not offenders
    assert f"{PACK_NAME}.nodes" in sys.modules
    assert sys.modules.get("nodes") is None or "custom" not in str(getattr(sys.modules["nodes"], "__file__", ""))


def test_types_validate_motion(sub):
    types_mod = sub("nodes.types")
    with pytest.raises(ValueError, match="frames"):
        types_mod.Motion(torch.zeros(0, 32), 25.0)
    with pytest.raises(ValueError, match="fps"):
        types_mod.Motion(torch.zeros(3, 32), 0.0)
    assert types_mod.Motion(torch.zeros(3, 32), 25.0).frames == 3


# ------------------------------------------------------------------------------------------------
# Bridge: standalone and inside ComfyUI (with stand-in ComfyUI modules)
# ------------------------------------------------------------------------------------------------

def test_model_lists_skip_wav2vec2_folders_and_other_files(sub, tmp_path, monkeypatch):
    bridge = sub("nodes.bridge")
    for rel in ("renderer.ckpt", "generator.safetensors", "notes.txt", "more/renderer_fp16.pth",
                "wav2vec2-base-960h/config.json", "wav2vec2-base-960h/model.safetensors",
                "audio/w2v-local/config.json", "audio/w2v-local/pytorch_model.bin"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.setenv("IMTALKER_MODELS", str(tmp_path))
    assert bridge.list_checkpoints() == ["generator.safetensors", "more/renderer_fp16.pth", "renderer.ckpt"]
    assert bridge.list_wav2vec2_folders() == ["audio/w2v-local", "wav2vec2-base-960h"]
    assert bridge.find_checkpoint("more/renderer_fp16.pth") == str(tmp_path / "more" / "renderer_fp16.pth")
    with pytest.raises(FileNotFoundError, match=r"renderer\.ckpt.*huggingface\.co/cbsjtu01/IMTalker"):
        bridge.find_checkpoint("../renderer.ckpt")
    with pytest.raises(FileNotFoundError, match="wav2vec2-base-960h/ with"):
        bridge.find_wav2vec2_folder("audio")


def test_standalone_model_folders_are_the_command_lines(sub, tmp_path, monkeypatch):
    """Outside ComfyUI the nodes read the folder the command line reads: `$IMTALKER_MODELS` (a list
    here), else `model_files.default_models_dir()`."""
    bridge = sub("nodes.bridge")
    model_files = sub("imtalker_core.model_files")
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("IMTALKER_MODELS", f"{first}{os.pathsep}{second}")
    assert bridge.model_folders() == [str(first), str(second)]
    assert bridge.download_folder() == str(first)
    monkeypatch.setenv("IMTALKER_MODELS", str(first))
    assert model_files.default_models_dir() == first and bridge.model_folders() == [str(first)]
    monkeypatch.delenv("IMTALKER_MODELS")
    assert bridge.model_folders() == [str(model_files.default_models_dir())]
    assert model_files.MODELS_ENV == "IMTALKER_MODELS"


class FakeComfy:
    """Stand-ins for the ComfyUI modules the bridge uses, recording what it asks of them."""

    def __init__(self, models_dir, output_dir):
        self.loads, self.progress, self.interrupt = [], [], False
        fake = self
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(models_dir)
        # As extra_model_paths.yaml leaves it: a user folder under our key, with no extension filter.
        folder_paths.folder_names_and_paths = {"imtalker": (["/elsewhere/imtalker"], set())}
        folder_paths.get_folder_paths = lambda key: folder_paths.folder_names_and_paths[key][0][:]
        folder_paths.get_output_directory = lambda: str(output_dir)
        folder_paths.get_save_image_path = lambda prefix, out, w, h: (os.path.join(out, "sub"), "clip", 7, "sub",
                                                                      prefix)
        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.should_use_fp16 = lambda device=None: True
        mm.load_models_gpu = lambda models, **kw: fake.loads.append((models, kw))

        def throw():
            if fake.interrupt:
                raise InterruptedError("cancelled")
        mm.throw_exception_if_processing_interrupted = throw
        patcher = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
        patcher.ModelPatcher = ModelPatcher
        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total):
                fake.progress.append(("new", total))

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total) if preview is None else (value, total, preview))
        utils.ProgressBar = ProgressBar
        self.modules = {"folder_paths": folder_paths, "comfy": types.ModuleType("comfy"),
                        "comfy.model_management": mm, "comfy.model_patcher": patcher, "comfy.utils": utils}


def test_bridge_inside_comfyui_uses_comfy_services(sub, tmp_path, monkeypatch):
    bridge = sub("nodes.bridge")
    fake = FakeComfy(tmp_path / "models", tmp_path / "out")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert bridge.inside_comfyui()
    bridge.register_model_folder()
    paths, extensions = fake.modules["folder_paths"].folder_names_and_paths["imtalker"]
    assert paths == [str(tmp_path / "models" / "imtalker"), "/elsewhere/imtalker"]
    assert extensions == {".ckpt", ".pt", ".pth", ".safetensors"}
    assert bridge.choose_dtype("auto", torch.device("cuda")) == torch.float16
    assert bridge.choose_dtype("bf16", torch.device("cuda")) == torch.bfloat16

    managed = bridge.manage_model(torch.nn.Linear(2, 2), "x.ckpt", torch.float32)
    assert managed.patcher is not None and bridge.ensure_loaded(managed, memory_required=10) is managed.module
    (patchers, options), = fake.loads
    assert patchers == [managed.patcher] and options == {"memory_required": 10, "force_full_load": True}

    progress = bridge.Progress(4, "test")
    progress(2, 4)
    assert fake.progress == [("new", 4), (2, 4)]
    fake.interrupt = True
    with pytest.raises(InterruptedError):
        bridge.check_interrupt()
    path, filename, subfolder = bridge.next_output_path("IMTalker/x", "mp4")
    assert (filename, subfolder) == ("clip_00007_.mp4", "sub") and os.path.isdir(os.path.dirname(path))


def test_progress_previews_the_newest_frame_at_most_twice_a_second(sub, tmp_path, monkeypatch):
    """Inside ComfyUI the render nodes' bar also carries a JPEG of the newest frame, as a sampler's previews:
    the first at once, then one per `PREVIEW_INTERVAL_S`, large frames shrunk to `PREVIEW_SIZE`."""
    bridge = sub("nodes.bridge")
    fake = FakeComfy(tmp_path / "models", tmp_path / "out")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    clock = [100.0]
    monkeypatch.setattr(bridge.time, "perf_counter", lambda: clock[0])
    progress = bridge.Progress(4, "rendering frames")
    progress(1, 4)
    # A pasted-back photo 1024 high, 768 wide: red above, blue below; the batch's first frame is never shown.
    photo = torch.zeros(2, 1024, 768, 3)
    photo[1, :512, :, 0] = 1.0
    photo[1, 512:, :, 2] = 1.0
    progress.preview(photo)
    value, total, (kind, image, size) = fake.progress[-1]
    assert (value, total, kind, size) == (1, 4, "JPEG", bridge.PREVIEW_SIZE)
    assert image.mode == "RGB" and image.size == (384, 512)  # PIL: (width, height)
    pixels = np.asarray(image)
    assert pixels[100, 200].tolist() == [255, 0, 0] and pixels[400, 200].tolist() == [0, 0, 255]

    progress(2, 4)
    clock[0] += bridge.PREVIEW_INTERVAL_S / 2
    progress.preview(photo)
    assert fake.progress[-1] == (2, 4)  # too soon: no preview
    clock[0] += bridge.PREVIEW_INTERVAL_S
    small = torch.randint(0, 256, (1, 40, 30, 3), dtype=torch.uint8)
    progress.preview(small)
    value, total, (kind, image, size) = fake.progress[-1]
    assert (value, total) == (2, 4) and np.array_equal(np.asarray(image), small[0].numpy())  # kept as it is


def test_progress_preview_is_a_no_op_standalone(sub, monkeypatch):
    bridge = sub("nodes.bridge")
    assert not bridge.inside_comfyui()

    def refuse(frame):
        raise AssertionError("no preview image is made without ComfyUI")
    monkeypatch.setattr(bridge, "preview_image", refuse)
    progress = bridge.Progress(1, "rendering frames")
    progress(1, 1)
    progress.preview(torch.rand(1, 8, 8, 3))


def test_bridge_reports_broken_comfyui_instead_of_falling_back(sub, monkeypatch):
    bridge = sub("nodes.bridge")
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.delitem(sys.modules, "comfy.utils", raising=False)
    with pytest.raises(bridge.ComfyUnavailableError, match="comfy.utils"):
        bridge.Progress(3, "test")


def test_bridge_standalone_fallbacks(sub, env_dirs):
    bridge = sub("nodes.bridge")
    assert not bridge.inside_comfyui()
    assert bridge.compute_device() == torch.device("cpu")
    assert bridge.choose_dtype("auto", bridge.compute_device()) == torch.float32
    bridge.check_interrupt()
    bridge.Progress(3, "test")(1, 3)
    first, _, _ = bridge.next_output_path("clips/a", "mp4")
    open(first, "wb").close()
    second, name, subfolder = bridge.next_output_path("clips/a", "mp4")
    assert (name, subfolder) == ("a_00002_.mp4", "clips") and second.startswith(str(env_dirs[1]))
    with pytest.raises(ValueError, match="outside the output folder"):
        bridge.next_output_path("../escape", "mp4")
    with pytest.raises(ValueError, match="AUDIO"):
        bridge.audio_waveform(torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------

def test_loaders_list_and_validate_model_files(pack, env_dirs):
    renderer_spec = pack.NODE_CLASS_MAPPINGS["IMTalkerLoadRenderer"].INPUT_TYPES()["required"]
    assert renderer_spec["renderer_name"][0][0] == "renderer.ckpt"  # the likely file is the default
    generator_cls = pack.NODE_CLASS_MAPPINGS["IMTalkerLoadGenerator"]
    generator_spec = generator_cls.INPUT_TYPES()["required"]
    assert generator_spec["generator_name"][0][0] == "generator.ckpt"
    assert generator_spec["wav2vec2_folder"][0] == ["wav2vec2-base-960h"]
    assert generator_cls.VALIDATE_INPUTS("generator.ckpt", "wav2vec2-base-960h") is True
    message = generator_cls.VALIDATE_INPUTS("generator.ckpt", "no-such-folder")
    assert "no-such-folder" in message and "preprocessor_config.json" in message
    message = pack.NODE_CLASS_MAPPINGS["IMTalkerLoadRenderer"].VALIDATE_INPUTS("missing.ckpt")
    assert "missing.ckpt" in message and "renderer.ckpt, generator.ckpt" in message


def test_loaders_download_official_files_on_first_use(pack, sub, standin_dir, tmp_path, monkeypatch):
    """An empty models folder: the official names are offered, validated, and fetched on load."""
    import shutil

    monkeypatch.setenv("IMTALKER_MODELS", str(tmp_path))
    model_files = sub("imtalker_core.model_files")
    fetched = []

    def fake_fetch(root, names, progress=None):  # stands for the hub: copies the stand-in files
        fetched.extend(names)
        for name in names:
            source = standin_dir / name
            if name.endswith("pytorch_model.bin"):
                source = standin_dir / "wav2vec2-base-960h" / "model.safetensors"
                name = "wav2vec2-base-960h/model.safetensors"
            (Path(root) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, Path(root) / name)

    monkeypatch.setattr(model_files, "fetch", fake_fetch)
    renderer_cls = pack.NODE_CLASS_MAPPINGS["IMTalkerLoadRenderer"]
    assert renderer_cls.INPUT_TYPES()["required"]["renderer_name"][0] == ["renderer.ckpt"]
    assert renderer_cls.VALIDATE_INPUTS("renderer.ckpt", True) is True
    assert "renderer.ckpt" in renderer_cls.VALIDATE_INPUTS("renderer.ckpt", False)
    (model,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="fp32",
                   download_if_missing=True)
    assert fetched == ["renderer.ckpt"] and model.module.cfg.image_size == 512
    generator_cls = pack.NODE_CLASS_MAPPINGS["IMTalkerLoadGenerator"]
    assert generator_cls.VALIDATE_INPUTS("generator.ckpt", "wav2vec2-base-960h", True) is True
    fetched.clear()
    run(pack, "IMTalkerLoadGenerator", generator_name="generator.ckpt", wav2vec2_folder="wav2vec2-base-960h",
        precision="fp32", use_ema=False, download_if_missing=True)
    assert set(fetched) == {"generator.ckpt", "wav2vec2-base-960h/config.json",
                            "wav2vec2-base-960h/preprocessor_config.json", "wav2vec2-base-960h/pytorch_model.bin"}
    fetched.clear()
    run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="fp32")
    assert fetched == []  # downloaded once


def test_loaders_build_managed_models(renderer, generator):
    assert renderer.patcher is None and renderer.dtype == torch.float32
    assert renderer.module.cfg.image_size == 512 and not renderer.module.training
    assert generator.generator.module.cfg.motion_dim == 32
    assert generator.audio_encoder.module.sample_rate == 16000


def test_precision_tf32_loads_float32_models_allowed_tf32(pack, sub, env_dirs, renderer, generator):
    precision = sub("imtalker_core.precision")
    assert not precision.allows_tf32(renderer.module)  # "auto" on the CPU: fp32, true float32
    assert not precision.allows_tf32(generator.generator.module)
    (tf32,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="tf32")
    assert tf32.dtype == torch.float32 and precision.allows_tf32(tf32.module)
    (models,) = run(pack, "IMTalkerLoadGenerator", generator_name="generator.ckpt",
                    wav2vec2_folder="wav2vec2-base-960h", precision="tf32", use_ema=False)
    assert all(precision.allows_tf32(m.module) for m in (models.generator, models.audio_encoder))
    assert models.generator.dtype == torch.float32


def test_loaders_set_the_compile_mode_and_say_when_it_only_costs_time(pack, sub, env_dirs, monkeypatch):
    compiled, bridge = sub("imtalker_core.compiled"), sub("nodes.bridge")
    notes = []
    monkeypatch.setattr(bridge, "notify", lambda message, level=None: notes.append(message))
    (model,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="fp32",
                   compile="reduce-overhead")
    assert compiled.compile_mode(model.module) == "reduce-overhead"  # compiled at its first use, not here
    assert len(notes) == 1 and "Load Renderer" in notes[0] and "CPU" in notes[0]
    (models,) = run(pack, "IMTalkerLoadGenerator", generator_name="generator.ckpt",
                    wav2vec2_folder="wav2vec2-base-960h", precision="fp32", use_ema=False, compile="default")
    assert compiled.compile_mode(models.generator.module) == "default"
    assert len(notes) == 2 and "Load Generator" in notes[1]
    (plain,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="fp32")
    assert compiled.compile_mode(plain.module) == "off" and len(notes) == 2
    cuda = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(bridge, "compute_device", lambda: cuda)
    (gpu,) = run(pack, "IMTalkerLoadRenderer", renderer_name="renderer.ckpt", precision="fp32", compile="default")
    assert compiled.compile_mode(gpu.module) == "default" and len(notes) == 2  # worth it there: no notice


def test_renderer_loader_names_a_swapped_file(pack, sub, env_dirs):
    errors = sub("imtalker_core.errors")
    with pytest.raises(errors.CheckpointError, match="generator"):
        run(pack, "IMTalkerLoadRenderer", renderer_name="generator.ckpt", precision="fp32")


# ------------------------------------------------------------------------------------------------
# Face crop and paste-back
# ------------------------------------------------------------------------------------------------

def test_crop_face_outputs(cropped, photo):
    face, box, mask = cropped
    assert face.shape == (1, 512, 512, 3) and face.dtype == torch.float32
    assert (box.image_h, box.image_w) == tuple(photo.shape[1:3])
    assert mask.shape == (1, *photo.shape[1:3]) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_crop_face_without_face(pack, sub):
    blank = torch.full((1, 300, 400, 3), 0.5)
    with pytest.raises(sub("imtalker_core.errors").InputError, match="No face"):
        run(pack, "IMTalkerCropFace", image=blank, scale=1.6, on_no_face="error")
    face, box, _ = run(pack, "IMTalkerCropFace", image=blank, scale=1.6, on_no_face="center")
    assert face.shape == (1, 512, 512, 3) and box.size == 300
    # A batch follows the same option (it used to fall back to the centre whatever was asked).
    with pytest.raises(sub("imtalker_core.errors").InputError, match="No face.*on_no_face"):
        run(pack, "IMTalkerCropFace", image=blank.repeat(3, 1, 1, 1), scale=1.6, on_no_face="error")
    faces, _, _ = run(pack, "IMTalkerCropFace", image=blank.repeat(3, 1, 1, 1), scale=1.6, on_no_face="center")
    assert faces.shape == (3, 512, 512, 3)


def test_crop_face_batch_uses_one_box(pack, sub, media_dir):
    frames = driving_frames(sub, media_dir, 3)
    face, box, mask = run(pack, "IMTalkerCropFace", image=frames, scale=1.6, on_no_face="error")
    assert face.shape == (3, 512, 512, 3) and mask.shape == (1, 512, 512)


def test_paste_back(pack, sub, cropped, photo):
    _, box, _ = cropped
    frames = torch.rand(2, 512, 512, 3)
    (full,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=box, original=photo, feather=0.1)
    assert full.shape == (2, *photo.shape[1:]) and full.dtype == torch.float32
    per_frame = photo.repeat(2, 1, 1, 1)
    (full_each,) = run(pack, "IMTalkerPasteBack", frames=frames, crop=box, original=per_frame, feather=0.1)
    assert torch.equal(full, full_each)
    with pytest.raises(sub("imtalker_core.errors").InputError, match="one per frame"):
        run(pack, "IMTalkerPasteBack", frames=torch.rand(3, 512, 512, 3), crop=box, original=per_frame, feather=0.1)


def test_paste_back_checks_the_original_matches_the_crop(pack, sub, cropped):
    with pytest.raises(sub("imtalker_core.errors").InputError, match="crop was made from a 512x512"):
        run(pack, "IMTalkerPasteBack", frames=torch.rand(1, 512, 512, 3), crop=cropped[1],
            original=torch.rand(1, 100, 120, 3), feather=0.1)


# ------------------------------------------------------------------------------------------------
# Encoding, generation, rendering on stand-in weights
# ------------------------------------------------------------------------------------------------

def test_encode_identity(identity, sub):
    assert identity.motion.shape == (1, 32) and identity.vector.shape == (1, 512)


def test_encode_identity_rejects_a_non_image(pack, renderer, sub):
    with pytest.raises(sub("imtalker_core.errors").InputError, match="IMAGE"):
        run(pack, "IMTalkerEncodeIdentity", renderer=renderer, image=torch.zeros(512, 512, 3))


def test_encode_motion_from_driving_frames(pack, sub, renderer, media_dir):
    frames = driving_frames(sub, media_dir, 1)
    (motion,) = run(pack, "IMTalkerEncodeMotion", renderer=renderer, images=frames, fps=30.0, batch_size=8)
    assert motion.latents.shape == (1, 32) and motion.latents.device.type == "cpu" and motion.fps == 30.0
    assert torch.isfinite(motion.latents).all()


@pytest.fixture(scope="module")
def audio_motion(pack, generator, identity, media_dir):
    audio = comfy_audio(media_dir / "speech_44k_stereo.wav", 0.1)  # 44.1 kHz stereo → 16 kHz mono
    return run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity, audio=audio,
               seed=7, steps=2, cfg_scale=3.0)


def test_audio_to_motion(audio_motion, pack, generator, identity, media_dir, sub):
    motion, audio, fps = audio_motion
    assert fps == 25.0 and motion.fps == 25.0
    assert motion.latents.shape == (3, 32) and motion.latents.dtype == torch.float32  # ceil(0.1 s × 25)
    # The user's own audio (44.1 kHz stereo), padded with silence to exactly 3 frames = 0.12 s.
    source = comfy_audio(media_dir / "speech_44k_stereo.wav", 0.1)
    assert audio["sample_rate"] == 44100 and audio["waveform"].shape == (1, 2, 3 * 44100 // 25)
    assert torch.equal(audio["waveform"][..., :4410], source["waveform"][..., :4410])
    assert not audio["waveform"][..., 4410:].any()
    # Same seed, same motion; the optional controls are accepted.
    controls = sub("nodes.types").Controls(pose=torch.zeros(3, 3))
    again, _, _ = run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity,
                      audio=comfy_audio(media_dir / "speech_44k_stereo.wav", 0.1), seed=7, steps=2,
                      cfg_scale=3.0, controls=controls)
    assert again.latents.shape == motion.latents.shape


def test_audio_to_motion_is_deterministic(pack, generator, identity, media_dir):
    audio = comfy_audio(media_dir / "speech_16k_mono.wav", 0.06)
    first = run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity, audio=audio,
                seed=3, steps=2, cfg_scale=1.0)[0]
    second = run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity, audio=audio,
                 seed=3, steps=2, cfg_scale=1.0)[0]
    assert first.latents.shape == (2, 32) and torch.equal(first.latents, second.latents)


def test_audio_to_motion_noise_modes(pack, generator, identity, media_dir):
    """Both modes start the first 2 s window from the same noise; only 'reference' (the default)
    draws new noise for the next window."""
    audio = comfy_audio(media_dir / "speech_16k_mono.wav", 2.2)  # 55 frames: two windows
    kwargs = dict(generator=generator, identity=identity, audio=audio, seed=5, steps=2, cfg_scale=1.0)
    default = run(pack, "IMTalkerAudioToMotion", **kwargs)[0].latents
    fresh = run(pack, "IMTalkerAudioToMotion", noise="reference", **kwargs)[0].latents
    fixed = run(pack, "IMTalkerAudioToMotion", noise="fixed_per_window", **kwargs)[0].latents
    assert default.shape == (55, 32) and torch.equal(default, fresh)
    assert torch.equal(fresh[:50], fixed[:50])
    assert (fresh[50:] - fixed[50:]).abs().max() > 0.1


def test_audio_to_motion_rejects_empty_audio(pack, sub, generator, identity):
    empty = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}
    with pytest.raises(sub("imtalker_core.errors").InputError, match="empty"):
        run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity, audio=empty,
            seed=0, steps=2, cfg_scale=3.0)


def test_render_one_frame(pack, sub, renderer, identity, audio_motion):
    motion = sub("nodes.types").Motion(audio_motion[0].latents[:1], 25.0)
    (frames,) = run(pack, "IMTalkerRender", renderer=renderer, identity=identity, motion=motion, batch_size=4)
    assert frames.shape == (1, 512, 512, 3) and frames.device.type == "cpu"
    assert frames.dtype == torch.float32 and 0.0 <= frames.min() and frames.max() <= 1.0


def test_render_to_video_with_paste_back_and_audio(pack, sub, renderer, identity, audio_motion, cropped,
                                                   photo, env_dirs):
    motion = sub("nodes.types").Motion(audio_motion[0].latents[:1], 25.0)
    instance = node(pack, "IMTalkerRenderToVideo")
    out = instance.render(renderer=renderer, identity=identity, motion=motion, filename_prefix="tests/clip",
                          batch_size=2, audio=audio_motion[1], crop=cropped[1], original=photo, feather=0.1)
    (path,) = out["result"]
    assert out["ui"]["images"][0]["subfolder"] == "tests" and os.path.isfile(path)
    assert path.startswith(str(env_dirs[1]))
    with av.open(path) as container:
        video = container.streams.video[0]
        assert (video.width, video.height) == (photo.shape[2], photo.shape[1])
        assert len(container.streams.audio) == 1
        assert sum(1 for _ in container.decode(video=0)) == 1


def test_render_to_video_needs_crop_and_original_together(pack, sub, renderer, identity, audio_motion, cropped):
    with pytest.raises(sub("imtalker_core.errors").InputError, match="both 'crop' and 'original'"):
        node(pack, "IMTalkerRenderToVideo").render(renderer=renderer, identity=identity, motion=audio_motion[0],
                                                   filename_prefix="x", batch_size=1, crop=cropped[1])


def test_render_to_video_checks_originals_before_rendering(pack, sub, renderer, identity, audio_motion, cropped,
                                                           photo):
    # 2 originals for 3 frames: refused at once, before any frame is rendered or file written.
    with pytest.raises(sub("imtalker_core.errors").InputError, match="exactly one per frame"):
        node(pack, "IMTalkerRenderToVideo").render(renderer=renderer, identity=identity, motion=audio_motion[0],
                                                   filename_prefix="x", batch_size=1, crop=cropped[1],
                                                   original=photo.repeat(2, 1, 1, 1))


@pytest.mark.parametrize("prefix", ["", "   ", "IMTalker/", "."])
def test_render_to_video_refuses_a_prefix_without_a_name(pack, sub, renderer, identity, audio_motion, prefix,
                                                         env_dirs):
    cls = pack.NODE_CLASS_MAPPINGS["IMTalkerRenderToVideo"]
    assert "names no file" in cls.VALIDATE_INPUTS(filename_prefix=prefix)
    assert cls.VALIDATE_INPUTS(filename_prefix="IMTalker/talking") is True
    with pytest.raises(sub("imtalker_core.errors").InputError, match="names no file"):
        node(pack, "IMTalkerRenderToVideo").render(renderer=renderer, identity=identity, motion=audio_motion[0],
                                                   filename_prefix=prefix, batch_size=1)
    assert not [p for p in env_dirs[1].rglob("*") if p.name.startswith(".")]
