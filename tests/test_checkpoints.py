"""Model files: official layouts with training extras, bare dicts, safetensors, bad files."""
from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from imtalker_core import CheckpointError, convert_to_safetensors, load_generator, load_renderer
from imtalker_core.checkpoints import model_entries, read_file
from tests.helpers.standin import write_official_layout


class TrainerLoopState:
    """Stands for a class a Lightning checkpoint names in its metadata; must never be imported."""

    def __init__(self):
        self.epoch = 3


def same_weights(model, state):
    own = model.state_dict()
    return all(torch.equal(own[k].float(), v.float()) for k, v in state.items())


@pytest.fixture(scope="module")
def generator_with_extras(tmp_path_factory, standin_state):
    """The generator in the layout the authors' training run most likely saved."""
    gen = standin_state["generator"]
    path = tmp_path_factory.mktemp("ckpt") / "generator.ckpt"
    extras = {
        "ema_state_dict": {k: v + 1.0 for k, v in gen.items()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [{"last_epoch": 7}],
        "loops": {"fit_loop": TrainerLoopState()},
        "hyper_parameters": {"opt": argparse.Namespace(fps=25.0, dim_w=32)},
        "epoch": 12, "global_step": 34000, "pytorch-lightning_version": "2.1.0",
    }
    state = dict(gen)
    state["audio_encoder.wav2vec2.feature_projection.projection.weight"] = torch.zeros(768, 512)
    write_official_layout("generator", path, extra=extras, state=state)
    return path


def test_official_renderer_layout(standin_dir, standin_renderer, standin_state):
    assert same_weights(standin_renderer, standin_state["renderer"])
    assert not standin_renderer.training


def test_generator_with_training_extras(generator_with_extras, standin_state, caplog):
    model = load_generator(generator_with_extras)
    assert same_weights(model, standin_state["generator"])
    assert "opaque" in caplog.text and "TrainerLoopState" in caplog.text
    assert "1 entries of the wav2vec2 copy are not generator weights" in caplog.text


def test_generator_ema_option(generator_with_extras, standin_state):
    ema = load_generator(generator_with_extras, use_ema=True)
    assert same_weights(ema, {k: v + 1.0 for k, v in standin_state["generator"].items()})


def test_ema_option_without_ema_weights(standin_dir):
    with pytest.raises(CheckpointError, match="no 'ema_state_dict'"):
        load_generator(standin_dir / "generator.ckpt", use_ema=True)


def test_unpickling_never_imports_metadata_classes(generator_with_extras):
    raw = read_file(generator_with_extras)
    loop_state = raw["loops"]["fit_loop"]
    assert not isinstance(loop_state, TrainerLoopState)
    assert loop_state.state == {"epoch": 3}


def test_bare_and_safetensors_files(tmp_path, standin_state):
    from safetensors.torch import save_file

    gen = standin_state["generator"]
    torch.save(gen, tmp_path / "bare.pt")
    torch.save({"model." + k: v for k, v in gen.items()}, tmp_path / "prefixed.pth")
    save_file({k: v.contiguous() for k, v in gen.items()}, tmp_path / "generator.safetensors")
    for name in ("bare.pt", "prefixed.pth", "generator.safetensors"):
        assert same_weights(load_generator(tmp_path / name), gen), name


def test_converter_writes_only_model_entries(tmp_path, generator_with_extras, standin_state):
    out = tmp_path / "generator_fp16.safetensors"
    stats = convert_to_safetensors(generator_with_extras, out, dtype=torch.float16, keep_wav2vec2=False)
    assert stats["tensors"] == len(standin_state["generator"])
    entries = read_file(out)
    assert set(entries) == set(standin_state["generator"])
    assert all(v.dtype == torch.float16 for v in entries.values())
    model = load_generator(out)
    ref = standin_state["generator"]["fmt.c_embedder.weight"]
    assert torch.allclose(model.fmt.c_embedder.weight, ref, atol=1e-3, rtol=1e-3)


def test_wrong_kind_is_named(standin_dir):
    with pytest.raises(CheckpointError, match="looks like an IMTalker generator"):
        load_renderer(standin_dir / "generator.ckpt")


def test_random_file_rejected(tmp_path):
    path = tmp_path / "other_model.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(4, 4), "head.bias": torch.zeros(4)}}, path)
    with pytest.raises(CheckpointError, match=r"other_model\.ckpt does not match the IMTalker renderer: .*missing"):
        load_renderer(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        load_generator(path)


def test_truncated_checkpoint(tmp_path, standin_dir):
    src = standin_dir / "generator.ckpt"
    path = tmp_path / "generator.ckpt"
    with open(src, "rb") as f_in, open(path, "wb") as f_out:
        f_out.write(f_in.read(src.stat().st_size // 2))
    with pytest.raises(CheckpointError, match="generator.ckpt"):
        load_generator(path)


def test_truncated_safetensors(tmp_path, standin_state):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in standin_state["generator"].items()}, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_generator(cut)


def test_missing_tensor_reported_with_count(tmp_path, standin_state):
    state = dict(standin_state["generator"])
    state.pop("fmt.decoder.linear.bias")
    path = write_official_layout("generator", tmp_path / "generator.ckpt", state=state)
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. fmt\.decoder\.linear\.bias\)"):
        load_generator(path)


def test_missing_file():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_renderer("no/such/renderer.ckpt")


def test_model_entries_strip_prefix_only_at_start():
    raw = {"state_dict": {"model.fmt.x": torch.zeros(1), "model.model.y": torch.zeros(1),
                          "other.model.z": torch.zeros(1)}}
    assert set(model_entries(raw, "generator")) == {"fmt.x", "model.y"}


def test_derived_buffers_may_be_absent_or_present(tmp_path, standin_state):
    from imtalker_core import MotionGenerator

    state = dict(standin_state["generator"])
    state["fmt.rotary_emb.inv_freq"] = MotionGenerator().fmt.rotary_emb.inv_freq.clone()
    path = write_official_layout("generator", tmp_path / "generator.ckpt", state=state)
    assert same_weights(load_generator(path), standin_state["generator"])
    shutil.rmtree(tmp_path)


def test_integer_derived_buffers_must_be_the_architectures(tmp_path, standin_state):
    from imtalker_core import IMTRenderer
    from imtalker_core.config import RendererConfig

    key = "frame_decoder.transformer_blocks.4.blocks.1.attn.relative_position_index"
    index = IMTRenderer(RendererConfig()).state_dict()[key].clone()
    state = dict(standin_state["renderer"], **{key: index})
    assert same_weights(load_renderer(write_official_layout("renderer", tmp_path / "ok.ckpt", state=state)),
                        standin_state["renderer"])
    index[0, 0] = 10 ** 6
    path = write_official_layout("renderer", tmp_path / "renderer.ckpt", state=dict(state, **{key: index}))
    with pytest.raises(CheckpointError, match=f"damaged {key}.*download the file again"):
        load_renderer(path)


def test_safetensors_records_its_configuration(tmp_path):
    """A small model saved with `config_metadata` loads without naming its config; a damaged record is
    reported, not replaced by the official config."""
    from safetensors.torch import save_file

    from imtalker_core.checkpoints import CONFIG_METADATA_KEY, config_from_file, config_metadata
    from imtalker_core.config import tiny_generator_config, tiny_renderer_config
    from imtalker_core.generator import MotionGenerator
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    for kind, model, load in (("renderer", IMTRenderer(tiny_renderer_config()), load_renderer),
                              ("generator", MotionGenerator(tiny_generator_config()), load_generator)):
        path = tmp_path / f"{kind}.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata=config_metadata(model.cfg))
        assert config_from_file(path, kind) == model.cfg
        loaded = load(path)
        assert loaded.cfg == model.cfg
        assert same_weights(loaded, state)
        broken = tmp_path / f"{kind}_broken.safetensors"
        save_file(state, str(broken), metadata={CONFIG_METADATA_KEY: '{"no_such_field": 1}'})
        with pytest.raises(CheckpointError, match="no_such_field"):
            load(broken)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert config_from_file(plain, "renderer") is None
