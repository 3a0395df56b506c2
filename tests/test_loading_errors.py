"""Every model-file problem is one line in our words: the file, the cause, the fix (issue 8, hardening).

Malicious pickles here carry harmless payloads that would create a marker file if they ever ran;
each test asserts the marker does not exist.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
import shlex
import shutil
import subprocess

import pytest
import torch

from imtalker_core import CheckpointError, checkpoints, cli, convert_to_safetensors, load_generator, load_renderer
from imtalker_core import safe_read
from imtalker_core.checkpoints import check_finite, load_audio_encoder, load_generator_and_audio_encoder, read_file
from imtalker_core.safe_read import _is_code
from imtalker_core.errors import IMTalkerError, InputError
from imtalker_core.generator.audio import AudioEncoder
from imtalker_core.model_files import HF_URL, WAV2VEC2_UPSTREAM, MissingFilesError
from tests.helpers.standin import write_official_layout

W2V_FIX = "re-download wav2vec2-base-960h/"


def one_line(err: BaseException, *needles: str) -> str:
    """The message of `err`, checked to be one line holding every needle and none of torch's advice."""
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, text
    assert "weights_only=False" not in text and "weights_only" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def cli_error(caplog, argv: list[str]) -> str:
    """Run the CLI; it must return 2 and log exactly one ERROR line. Returns that line."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0], errors[0]
    return errors[0]


# --- code in a pickle ------------------------------------------------------------------------------------

class _Payload:
    """Pickles as `func(*args)`; unpickling it unsafely would run that call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    touch = f"touch {shlex.quote(str(marker))}"
    return {
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        f"{os.system.__module__}.system": _Payload(os.system, touch),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        "functools.partial": functools.partial(os.system, touch),
        "torch.serialization.load": _Payload(torch.load, str(marker)),
    }


def _writers():
    """How a payload gets into a file: zip `torch.save`, the legacy torch format, a plain pickle (protocol 4)."""
    def plain(obj, path):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=4)

    return {
        "zip": lambda obj, path: torch.save(obj, path),
        "legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
        "pickle4": plain,
    }


def test_the_payloads_are_live(tmp_path):
    """Control: unpickled the unsafe way, a payload does create its marker, so `not marker.exists()` below
    means something."""
    for name in ("builtins.eval", f"{os.system.__module__}.system"):
        marker = tmp_path / "ran"
        pickle.loads(pickle.dumps(_payloads(marker)[name]))
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("writer", list(_writers()))
@pytest.mark.parametrize("payload", ["builtins.eval", "system", "subprocess.Popen", "functools.partial",
                                     "torch.serialization.load"])
def test_code_in_a_pickle_is_refused_and_never_run(tmp_path, writer, payload, caplog):
    marker = tmp_path / "ran"
    payloads = _payloads(marker)
    name = next(k for k in payloads if k.endswith(payload))
    path = tmp_path / "renderer.ckpt"
    obj = {"state_dict": {"gen.x": torch.zeros(2)}, "hyper_parameters": {"opt": payloads[name]}}
    _writers()[writer](obj, path)
    with pytest.raises(CheckpointError) as err:
        read_file(path)
    one_line(err.value, str(path), "holds code we refuse to run", name, "not an official IMTalker checkpoint",
             f"re-download it from {HF_URL}")
    assert not marker.exists()
    assert "opaque objects" not in caplog.text  # refused before any unpickling with stand-ins
    with pytest.raises(CheckpointError, match="holds code"):
        load_renderer(path)
    assert not marker.exists()


def test_unsafe_pickle_through_the_cli(tmp_path, caplog):
    marker = tmp_path / "ran"
    path = tmp_path / "generator.ckpt"
    torch.save({"state_dict": {}, "x": _payloads(marker)["builtins.eval"]}, path)
    line = cli_error(caplog, ["convert", str(path), str(tmp_path / "out.safetensors")])
    one_line(line, str(path), "holds code we refuse to run (builtins.eval)", HF_URL)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


class _LoopState:
    """A training-code class in checkpoint metadata: read as an inert stand-in, never imported."""

    def __init__(self):
        self.epoch = 3


@pytest.mark.parametrize("legacy", [False, True])
def test_metadata_classes_still_load(tmp_path, legacy, caplog):
    path = tmp_path / "generator.ckpt"
    obj = {"state_dict": {"model.x": torch.ones(2)}, "loops": _LoopState(),
           "hyper_parameters": {"opt": argparse.Namespace(fps=25.0), "type": dict}}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    raw = read_file(path)
    assert torch.equal(raw["state_dict"]["model.x"], torch.ones(2))
    assert isinstance(raw["loops"], safe_read.OpaqueObject) and raw["loops"].state == {"epoch": 3}
    assert "opaque objects" in caplog.text and "argparse.Namespace" in caplog.text


def test_what_counts_as_code():
    for name in ("builtins.eval", "builtins.exec", "builtins.getattr", "builtins.__import__", "posix.system",
                 "nt.system", "os.system", "subprocess.Popen", "sys.modules", "importlib.import_module",
                 "runpy.run_path", "shutil.rmtree", "socket.socket", "pickle.loads", "codecs.decode",
                 "functools.partial", "operator.attrgetter", "torch.load", "torch._C._nn.gelu",
                 "torch.serialization.load", "torch.hub.load", "torch.jit.load", "numpy.load",
                 "numpy.testing._private.utils.runstring", "types.FunctionType", "<a name computed while unpickling>"):
        assert _is_code(name), name
    for name in ("argparse.Namespace", "builtins.dict", "builtins.int", "omegaconf.dictconfig.DictConfig",
                 "lightning.fabric.utilities.data.AttributeDict", "pathlib.PosixPath", "collections.defaultdict",
                 "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "__main__.Options",
                 "torch.nn.modules.activation.GELU", "torch.optim.adam.Adam", "typing.Any", "types.SimpleNamespace"):
        assert not _is_code(name), name


# --- damaged files ---------------------------------------------------------------------------------------

def _half_of(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("damage", ["empty", "half_zip", "half_legacy", "random", "text"])
def test_damaged_checkpoint(tmp_path, standin_dir, damage):
    path = tmp_path / "generator.ckpt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "half_zip":
        _half_of(standin_dir / "generator.ckpt", path)
    elif damage == "half_legacy":
        legacy = tmp_path / "legacy.ckpt"
        torch.save({"state_dict": {"model.x": torch.randn(64, 64)}}, legacy, _use_new_zipfile_serialization=False)
        _half_of(legacy, path)
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).numpy().tobytes())
    else:
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(CheckpointError) as err:
        load_generator(path)
    one_line(err.value, str(path), "is truncated or not a PyTorch checkpoint",
             f"({path.stat().st_size:,} bytes)", f"re-download it from {HF_URL}")


def test_empty_checkpoint_through_the_cli(tmp_path, caplog):
    path = tmp_path / "renderer.ckpt"
    path.write_bytes(b"")
    line = cli_error(caplog, ["convert", str(path), str(tmp_path / "renderer.safetensors")])
    one_line(line, str(path), "is truncated or not a PyTorch checkpoint (0 bytes)", HF_URL)


@pytest.mark.parametrize("size", ["empty", "half"])
def test_damaged_safetensors(tmp_path, standin_state, size):
    from safetensors.torch import save_file

    path = tmp_path / "generator.safetensors"
    save_file({k: v.contiguous() for k, v in standin_state["generator"].items()}, path)
    if size == "empty":
        path.write_bytes(b"")
    else:
        _half_of(path, path)
    with pytest.raises(CheckpointError) as err:
        load_generator(path)
    one_line(err.value, str(path), "is truncated or not a safetensors file", f"({path.stat().st_size:,} bytes)",
             "convert it again", "delete it")


def test_folder_given_as_model_file(tmp_path):
    with pytest.raises(CheckpointError) as err:
        read_file(tmp_path)
    one_line(err.value, str(tmp_path), "is a folder")


def test_missing_model_file_names_the_fix():
    with pytest.raises(CheckpointError) as err:
        load_renderer("no/such/renderer.ckpt")
    one_line(err.value, "no/such/renderer.ckpt", "does not exist", HF_URL)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "renderer.ckpt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError) as err:
        read_file(path)
    one_line(err.value, str(path), "holds a list, not a state dict", HF_URL)


# --- NaN / inf weights -----------------------------------------------------------------------------------

def test_renderer_with_nan_weights(tmp_path, standin_state):
    key = "dense_feature_encoder.initial_conv.0.weight"
    state = dict(standin_state["renderer"])
    state[key] = state[key].clone()
    state[key].view(-1)[7] = float("nan")
    path = write_official_layout("renderer", tmp_path / "renderer.ckpt", state=state)
    with pytest.raises(CheckpointError) as err:
        load_renderer(path)
    one_line(err.value, str(path), f"has NaN/inf values in {key}", "the file is damaged", HF_URL)


def test_check_finite():
    check_finite({"a": torch.full((4,), 3e38), "i": torch.arange(3)}, "f.ckpt")  # the sum overflows, no value does
    check_finite({"h": torch.full((100_000,), 60000.0, dtype=torch.float16)}, "f.ckpt")
    with pytest.raises(CheckpointError, match=r"f\.ckpt has NaN/inf values in b \(and 1 more tensors\)"):
        check_finite({"a": torch.zeros(3), "b": torch.tensor([1.0, float("inf")]),
                      "c": torch.tensor([float("-inf")], dtype=torch.bfloat16)}, "f.ckpt")


def test_nan_in_the_wav2vec2_copy(tmp_path, standin_dir, standin_state):
    from transformers import Wav2Vec2Model

    folder = standin_dir / "wav2vec2-base-960h"
    copy = {k: v.clone() for k, v in Wav2Vec2Model.from_pretrained(folder).state_dict().items()}
    copy["encoder.layers.0.attention.q_proj.weight"][0, 0] = float("nan")
    state = dict(standin_state["generator"])
    state.update({checkpoints.WAV2VEC2_PREFIX + k: v for k, v in copy.items()})
    path = write_official_layout("generator", tmp_path / "generator.ckpt", state=state)
    with pytest.raises(CheckpointError) as err:
        load_generator_and_audio_encoder(path, folder)
    one_line(err.value, str(path), "NaN/inf values in audio_encoder.wav2vec2.encoder.layers.0.attention.q_proj.weight")


# --- the wav2vec2 folder ---------------------------------------------------------------------------------

@pytest.fixture
def w2v(tmp_path, standin_dir):
    """A writable copy of the stand-in wav2vec2 folder."""
    folder = tmp_path / "wav2vec2-base-960h"
    shutil.copytree(standin_dir / "wav2vec2-base-960h", folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_wav2vec2_folder(tmp_path, standin_dir, monkeypatch):
    folder = tmp_path / "wav2vec2-base-960h"
    for load in (AudioEncoder.from_folder, AudioEncoder.from_config, load_audio_encoder):
        with pytest.raises(InputError) as err:
            load(folder)
        assert isinstance(err.value, FileNotFoundError)  # callers catching that keep working
        one_line(err.value, str(folder), "does not exist", W2V_FIX, HF_URL, WAV2VEC2_UPSTREAM)

    def never(path):
        raise AssertionError(f"read {path} before checking the folder")

    monkeypatch.setattr(checkpoints, "read_file", never)  # the folder is checked before the long generator read
    with pytest.raises(MissingFilesError, match="does not exist"):
        load_generator_and_audio_encoder(standin_dir / "generator.ckpt", folder)


def test_wav2vec2_folder_without_weights(w2v):
    (w2v / "model.safetensors").unlink()
    with pytest.raises(MissingFilesError) as err:
        AudioEncoder.from_folder(w2v)
    one_line(err.value, str(w2v), "has no weights (model.safetensors or pytorch_model.bin)", W2V_FIX)
    assert AudioEncoder.from_config(w2v) is not None  # the copy path needs no weights file


@pytest.mark.parametrize("content, cause", [
    ("{not json", "is not valid JSON"),
    ("\xff\xfe", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object of settings"),
    ("{}", "lacks hidden_size, num_hidden_layers"),
])
@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_unreadable_wav2vec2_settings(w2v, name, content, cause):
    if name == "preprocessor_config.json" and content == "{}":
        cause = "lacks sampling_rate"
    (w2v / name).write_text(content, encoding="latin-1")
    for load in (AudioEncoder.from_folder, AudioEncoder.from_config):
        with pytest.raises(CheckpointError) as err:
            load(w2v)
        one_line(err.value, str(w2v / name), cause, W2V_FIX)


def test_config_with_a_value_of_the_wrong_type(w2v):
    _edit_config(w2v, hidden_size="big")
    with pytest.raises(CheckpointError) as err:
        AudioEncoder.from_config(w2v)
    one_line(err.value, str(w2v / "config.json"), "is not a usable wav2vec2 configuration", "hidden_size", W2V_FIX)


@pytest.mark.parametrize("changes, cause", [
    ({"num_hidden_layers": 2}, "missing (e.g. encoder.layers.1."),
    ({"num_hidden_layers": 0}, "unexpected (e.g. encoder.layers.0."),
    ({"conv_dim": [64] * 7}, "with another shape (e.g. feature_extractor."),
])
def test_weights_that_do_not_match_the_config(w2v, changes, cause):
    _edit_config(w2v, **changes)
    with pytest.raises(CheckpointError) as err:
        AudioEncoder.from_folder(w2v)
    one_line(err.value, str(w2v / "model.safetensors"), f"does not match the architecture in {w2v / 'config.json'}",
             cause, W2V_FIX)


@pytest.fixture
def w2v_bin(w2v):
    """The folder in the official file's layout: a `Wav2Vec2ForCTC` state dict (with `lm_head`) and the older
    weight-norm names, as `pytorch_model.bin`."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(w2v))
    state = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v for k, v in model.state_dict().items()}
    torch.save(state, w2v / "pytorch_model.bin")
    (w2v / "model.safetensors").unlink()
    return w2v, model.wav2vec2.state_dict()


def test_official_layout_loads(w2v_bin):
    folder, expected = w2v_bin
    own = AudioEncoder.from_folder(folder).wav2vec2.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected.items())


@pytest.mark.parametrize("damage", ["empty", "half"])
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_damaged_wav2vec2_weights(request, layout, damage):
    folder = request.getfixturevalue("w2v") if layout == "safetensors" else request.getfixturevalue("w2v_bin")[0]
    path = folder / ("model.safetensors" if layout == "safetensors" else "pytorch_model.bin")
    if damage == "empty":
        path.write_bytes(b"")
    else:
        _half_of(path, path)
    for load in (AudioEncoder.from_folder, load_audio_encoder):
        with pytest.raises(CheckpointError) as err:
            load(folder)
        one_line(err.value, str(path), "is truncated or not a wav2vec2 weights file",
                 f"({path.stat().st_size:,} bytes)", W2V_FIX)


def test_nan_in_the_wav2vec2_folder(w2v_bin):
    folder, _ = w2v_bin
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["wav2vec2.feature_projection.projection.weight"][0, 0] = float("inf")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        AudioEncoder.from_folder(folder)
    one_line(err.value, str(folder / "pytorch_model.bin"), "NaN/inf values in feature_projection.projection.weight",
             W2V_FIX)


# --- convert ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_reading(monkeypatch):
    def never(path):
        raise AssertionError(f"read {path} before checking the output")

    monkeypatch.setattr(checkpoints, "read_file", never)


def test_convert_into_a_missing_folder(tmp_path, standin_dir, no_reading, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = standin_dir / "generator.ckpt"
    with pytest.raises(InputError) as err:
        convert_to_safetensors(src, "no/such/dir/out.safetensors")
    one_line(err.value, "no/such/dir/out.safetensors", "the folder no/such/dir does not exist", "create it first")
    line = cli_error(caplog, ["convert", str(src), "no/such/dir/out.safetensors"])
    assert line == str(err.value)


def test_convert_onto_its_source(tmp_path, standin_state, no_reading, caplog):
    from safetensors.torch import save_file

    src = tmp_path / "generator.safetensors"
    save_file({"x": torch.zeros(1)}, src)
    os.link(src, tmp_path / "hardlink.safetensors")
    for dst in (src, tmp_path / "sub" / ".." / "generator.safetensors", tmp_path / "hardlink.safetensors"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputError) as err:
            convert_to_safetensors(src, dst)
        one_line(err.value, str(dst), "is the source file itself", "another name")
    cli_error(caplog, ["convert", str(src), str(src)])
    assert src.stat().st_size > 0


def test_convert_to_another_suffix(tmp_path, standin_dir, no_reading):
    with pytest.raises(InputError) as err:
        convert_to_safetensors(standin_dir / "generator.ckpt", tmp_path / "out.ckpt")
    one_line(err.value, "out.ckpt", "must end with .safetensors", "out.safetensors")


def test_failed_write_leaves_nothing(tmp_path, standin_dir):
    dst = tmp_path / "generator.safetensors"
    dst.mkdir()  # the finished file cannot take the output's name
    with pytest.raises(InputError) as err:
        convert_to_safetensors(standin_dir / "generator.ckpt", dst)
    one_line(err.value, f"cannot write {dst}", "choose another output path")
    assert os.listdir(tmp_path) == ["generator.safetensors"] and dst.is_dir()


def test_errors_are_imtalker_errors():
    assert issubclass(CheckpointError, IMTalkerError) and issubclass(MissingFilesError, IMTalkerError)
