"""Our modules have exactly the official state-dict keys, shapes and parameter counts."""
from __future__ import annotations

import pytest

from imtalker_core import IMTRenderer, MotionGenerator
from tests.helpers.standin import manifest, standin_tensor


@pytest.fixture(scope="module")
def official():
    return manifest()


@pytest.mark.parametrize("kind,model_cls", [("renderer", IMTRenderer), ("generator", MotionGenerator)])
def test_keys_and_shapes(official, kind, model_cls):
    model = model_cls()
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    theirs = {e["key"]: (tuple(e["shape"]), e["dtype"]) for e in official[kind]["entries"]}
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []
    assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == official[kind]["parameter_count"]


@pytest.mark.parametrize("kind,model_cls", [("renderer", IMTRenderer), ("generator", MotionGenerator)])
def test_derived_buffers_are_computed(official, kind, model_cls):
    """Entries the stand-in rule calls 'derived' are buffers our model builds itself, the same way."""
    model = model_cls()
    own = dict(model.named_buffers())
    derived = [e for e in official[kind]["entries"] if e["init"]["kind"] == "derived"]
    assert derived, "the manifest lists derived buffers"
    for entry in derived:
        assert entry["key"] in own
        assert standin_tensor(entry) is None


def test_standin_rule_reproduces_fixture_numbers():
    import json

    from tests.helpers.standin import parity_file

    expected = json.loads(parity_file("stand_in_check.json").read_text())
    entries = {e["key"]: e for kind in ("renderer", "generator") for e in manifest()[kind]["entries"]}
    for key, values in expected.items():
        got = standin_tensor(entries[key]).flatten()[:4].tolist()
        assert got == pytest.approx(values, abs=1e-7), key
