"""wav2vec2 weights from the generator file's copy (what the reference runs) or from the folder."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from imtalker_core import (CheckpointError, convert_to_safetensors, load_audio_encoder,
                           load_generator_and_audio_encoder)
from imtalker_core.checkpoints import WAV2VEC2_PREFIX, match_weight_norm_names, read_file, wav2vec2_copy
from tests.helpers.standin import write_official_layout, write_small_wav2vec2

POS_CONV = "encoder.pos_conv_embed.conv."
NAMINGS = {
    "weight_norm": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}


def with_naming(state: dict, naming: str) -> dict:
    """`state` with the positional convolution's weight-norm tensors under `naming` (either input naming)."""
    out = dict(state)
    g, v = NAMINGS[naming]
    for old_g, old_v in NAMINGS.values():
        if POS_CONV + old_g in out:
            out[POS_CONV + g] = out.pop(POS_CONV + old_g)
            out[POS_CONV + v] = out.pop(POS_CONV + old_v)
    return out


def generator_file(path, generator_state: dict, copy: dict | None):
    """A generator in the official layout; `copy` saved under `model.audio_encoder.wav2vec2.*`, as a
    Lightning training run of the reference's FM model saves its frozen wav2vec2."""
    state = dict(generator_state)
    state.update({WAV2VEC2_PREFIX + k: v for k, v in (copy or {}).items()})
    return write_official_layout("generator", path, state=state)


@pytest.fixture(scope="module")
def folder(standin_dir):
    return standin_dir / "wav2vec2-base-960h"


@pytest.fixture(scope="module")
def copy_state(tmp_path_factory):
    """A second small wav2vec2 (same architecture as the folder's, other seed) as the installed state dict."""
    from transformers import Wav2Vec2Model

    other = write_small_wav2vec2(tmp_path_factory.mktemp("w2v") / "other", seed=1)
    return {k: v.clone() for k, v in Wav2Vec2Model.from_pretrained(other).state_dict().items()}


@pytest.fixture(scope="module")
def generator_with_copy(tmp_path_factory, standin_state, copy_state):
    return generator_file(tmp_path_factory.mktemp("ckpt") / "generator.ckpt", standin_state["generator"], copy_state)


@pytest.fixture(scope="module")
def wave():
    return torch.randn(16000, generator=torch.Generator().manual_seed(3))


def same_params(module, state) -> bool:
    own = module.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items())


def test_copy_is_used(generator_with_copy, folder, copy_state, standin_state, caplog):
    caplog.set_level(logging.INFO, "imtalker_core")
    generator, encoder = load_generator_and_audio_encoder(generator_with_copy, folder)
    assert same_params(generator, standin_state["generator"])
    own = encoder.wav2vec2.state_dict()
    assert set(own) == set(copy_state)
    assert same_params(encoder.wav2vec2, copy_state)
    folder_state = load_audio_encoder(folder).wav2vec2.state_dict()
    assert not same_params(encoder.wav2vec2, folder_state)
    assert f"wav2vec2 weights: the copy inside generator.ckpt ({len(copy_state)} tensors)" in caplog.text
    assert "carries no copy" not in caplog.text
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_copy_changes_the_features(generator_with_copy, folder, wave):
    _, encoder = load_generator_and_audio_encoder(generator_with_copy, folder)
    with_copy = encoder(wave)
    folder_only = load_audio_encoder(folder)(wave)
    assert with_copy.shape == folder_only.shape == (1, 25, 768)
    assert (with_copy - folder_only).abs().mean() > 1e-2


def test_file_without_copy_uses_the_folder(standin_dir, folder, caplog):
    caplog.set_level(logging.INFO, "imtalker_core")
    _, encoder = load_generator_and_audio_encoder(standin_dir / "generator.ckpt", folder)
    assert same_params(encoder.wav2vec2, load_audio_encoder(folder).wav2vec2.state_dict())
    assert "wav2vec2 weights: the folder wav2vec2-base-960h (generator.ckpt carries no copy)" in caplog.text


def test_copy_needs_no_weights_file_in_the_folder(tmp_path, generator_with_copy, folder, copy_state):
    configs_only = tmp_path / "wav2vec2-base-960h"
    configs_only.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, configs_only)
    _, encoder = load_generator_and_audio_encoder(generator_with_copy, configs_only)
    assert same_params(encoder.wav2vec2, copy_state)


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_both_weight_norm_namings_load(tmp_path, standin_state, folder, copy_state, naming):
    stored = with_naming(copy_state, naming)
    assert POS_CONV + NAMINGS[naming][0] in stored
    path = generator_file(tmp_path / "generator.ckpt", standin_state["generator"], stored)
    _, encoder = load_generator_and_audio_encoder(path, folder)
    assert same_params(encoder.wav2vec2, copy_state)


def test_match_weight_norm_names():
    g, v = torch.ones(1, 1, 3), torch.zeros(4, 2, 3)
    old = {POS_CONV + "weight_g": g, POS_CONV + "weight_v": v, "other": g}
    new_keys = [POS_CONV + n for n in NAMINGS["parametrizations"]] + ["other"]
    renamed = match_weight_norm_names(old, new_keys)
    assert set(renamed) == set(new_keys)
    assert renamed[POS_CONV + "parametrizations.weight.original0"] is g
    assert renamed[POS_CONV + "parametrizations.weight.original1"] is v
    back = match_weight_norm_names(renamed, list(old))
    assert set(back) == set(old)
    assert match_weight_norm_names(old, list(old)) == old


def test_masked_spec_embed_may_be_absent(tmp_path, standin_state, folder, copy_state):
    assert "masked_spec_embed" in copy_state
    stored = {k: v for k, v in copy_state.items() if k != "masked_spec_embed"}
    path = generator_file(tmp_path / "generator.ckpt", standin_state["generator"], stored)
    _, encoder = load_generator_and_audio_encoder(path, folder)
    assert same_params(encoder.wav2vec2, stored)


@pytest.mark.parametrize("damage, message", [
    ("missing", r"1 missing \(e\.g\. encoder\.layers\.0\.attention\.q_proj\.weight\)"),
    ("shape", r"1 with the wrong shape \(e\.g\. feature_projection\.projection\.weight \[768, 256\] in the file, "
              r"\[768, 32\] in the folder\)"),
    ("unexpected", r"1 unexpected \(e\.g\. encoder\.layers\.1\.attention\.q_proj\.weight\)"),
])
def test_copy_with_another_architecture_is_rejected(tmp_path, standin_state, folder, copy_state, damage, message):
    stored = dict(copy_state)
    if damage == "missing":
        stored.pop("encoder.layers.0.attention.q_proj.weight")
    elif damage == "shape":
        stored["feature_projection.projection.weight"] = torch.zeros(768, 256)
    else:
        stored["encoder.layers.1.attention.q_proj.weight"] = torch.zeros(768, 768)
    path = generator_file(tmp_path / "generator.ckpt", standin_state["generator"], stored)
    with pytest.raises(CheckpointError, match=message) as err:
        load_generator_and_audio_encoder(path, folder)
    text = str(err.value)
    assert str(path) in text and str(folder) in text
    assert "wav2vec2-base-960h" in text and "--drop-wav2vec2" in text


def test_load_audio_encoder_with_weights(folder, copy_state):
    encoder = load_audio_encoder(folder, dtype=torch.float16, weights=copy_state)
    assert next(encoder.parameters()).dtype == torch.float16
    key = "encoder.layers.0.attention.q_proj.weight"
    assert torch.equal(encoder.wav2vec2.state_dict()[key], copy_state[key].half())


def test_wav2vec2_copy_of_each_layout(generator_with_copy, copy_state):
    raw = read_file(generator_with_copy)
    assert set(wav2vec2_copy(raw)) == set(copy_state)
    bare = {k[len("model."):]: v for k, v in raw["state_dict"].items()}
    assert set(wav2vec2_copy(bare)) == set(copy_state)
    assert wav2vec2_copy({"state_dict": {"model.fmt.x": torch.zeros(1)}}) == {}


def test_converter_keeps_the_copy(tmp_path, generator_with_copy, folder, copy_state, standin_state, caplog):
    out = tmp_path / "generator.safetensors"
    stats = convert_to_safetensors(generator_with_copy, out)
    assert stats["wav2vec2_tensors"] == len(copy_state)
    assert stats["tensors"] == len(standin_state["generator"]) + len(copy_state)
    written = read_file(out)
    assert {k for k in written if k.startswith(WAV2VEC2_PREFIX)} == {WAV2VEC2_PREFIX + k for k in copy_state}
    caplog.set_level(logging.INFO, "imtalker_core")
    generator, encoder = load_generator_and_audio_encoder(out, folder)
    assert same_params(generator, standin_state["generator"])
    assert same_params(encoder.wav2vec2, copy_state)
    assert "the copy inside generator.safetensors" in caplog.text


def test_converter_can_drop_the_copy(tmp_path, generator_with_copy, folder, standin_state, caplog):
    out = tmp_path / "generator.safetensors"
    stats = convert_to_safetensors(generator_with_copy, out, dtype=torch.float16, keep_wav2vec2=False)
    assert stats["wav2vec2_tensors"] == 0
    assert set(read_file(out)) == set(standin_state["generator"])
    caplog.set_level(logging.INFO, "imtalker_core")
    _, encoder = load_generator_and_audio_encoder(out, folder)
    assert same_params(encoder.wav2vec2, load_audio_encoder(folder).wav2vec2.state_dict())
    assert "generator.safetensors carries no copy" in caplog.text


def test_runner_uses_the_copy(tmp_path, standin_dir, generator_with_copy, copy_state):
    from imtalker_core import runner

    shutil.copy(standin_dir / "renderer.ckpt", tmp_path)
    shutil.copy(generator_with_copy, tmp_path)
    shutil.copytree(standin_dir / "wav2vec2-base-960h", tmp_path / "wav2vec2-base-960h")
    (tmp_path / "wav2vec2-base-960h" / "pytorch_model.bin").write_bytes(b"")  # counts as present, never read
    (tmp_path / "wav2vec2-base-960h" / "model.safetensors").unlink()
    models = runner.load_models(tmp_path, download=False)
    assert same_params(models.audio_encoder.wav2vec2, copy_state)


@pytest.mark.parametrize("flags, kept", [([], True), (["--drop-wav2vec2"], False)])
def test_convert_command_copy_option(tmp_path, generator_with_copy, copy_state, flags, kept):
    from imtalker_core import cli

    out = tmp_path / "generator.safetensors"
    assert cli.main(["convert", str(generator_with_copy), str(out), *flags]) == 0
    assert bool(wav2vec2_copy(read_file(out))) is kept
