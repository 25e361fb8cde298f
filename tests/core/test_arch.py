"""Architecture adapters: sites per tower, dead vision layers, unit weights, registry errors."""

import dataclasses

import pytest
import torch

from manu_core import arch
from manu_core.arch import ADAPTERS, ArchError, get_adapter, get_site, mlp_sites, register, unit_weights
from manu_core.models import ARCHS, TinySpec, build_tiny_model, train_tokenizer
from tests.core.helpers import SMALL, tiny_qwen2_vl


pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["What is this person's name?", "This person was born in Riga, Latvia.", "Where does Amelia live?"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def tiny(tok, arch_name, **kw):
    return build_tiny_model(TinySpec(arch=arch_name, **{**SMALL, **kw}), tok).eval()


def test_llava_sites_and_dead_vision_layer(tok):
    model = tiny(tok, "llava", vision_layers=3)  # vision_feature_layer=-2: layer 2 (the last) is dead
    sites = mlp_sites(model)
    assert [(s.tower, s.layer, s.width, s.kind.name) for s in sites] == [
        ("language", 0, 64, "gated"), ("language", 1, 64, "gated"), ("vision", 0, 48, "plain"), ("vision", 1, 48, "plain"),
    ]
    assert sites[0].hook_path == "model.language_model.layers.0.mlp.down_proj"
    assert sites[2].hook_path == "model.vision_tower.encoder.layers.0.mlp.fc2"
    assert sites[0].name == "language.0"
    every = mlp_sites(model, live_only=False)
    assert [(s.tower, s.layer, s.live) for s in every if s.tower == "vision"] == [
        ("vision", 0, True), ("vision", 1, True), ("vision", 2, False)]
    assert get_site(model, "vision", 2).live is False
    with pytest.raises(ArchError, match="vision layer 2 does not exist.*live"):
        get_site(model, "vision", 2, live_only=True)


def test_llava_vision_feature_layer_variants(tok):
    assert [s.layer for s in mlp_sites(tiny(tok, "llava", vision_feature_layer=-1), towers=("vision",))] == [0, 1]
    model = tiny(tok, "llava", vision_layers=3)
    for v, live in ((-1, [0, 1, 2]), (-3, [0]), (1, [0]), ([-3, -2], [0, 1]), ([0, 3], [0, 1, 2])):
        model.config.vision_feature_layer = v
        assert [s.layer for s in mlp_sites(model, towers=("vision",))] == live, v
    model.config.vision_feature_layer = -5
    with pytest.raises(ArchError, match="vision_feature_layer must index the vision tower's 4 hidden states; got -5"):
        mlp_sites(model)


def test_idefics2_every_vision_layer_live_and_connector_excluded(tok):
    model = tiny(tok, "idefics2")
    sites = mlp_sites(model)
    assert [(s.tower, s.layer) for s in sites] == [("language", 0), ("language", 1), ("vision", 0), ("vision", 1)]
    assert all(s.path.startswith(("model.text_model.layers.", "model.vision_model.encoder.layers.")) for s in sites)
    assert not any("connector" in s.path for s in sites)
    # every down_proj/fc2 of the towers, and only those
    towers = {n for n, _ in model.named_modules() if n.endswith((".mlp.down_proj", ".mlp.fc2")) and "connector" not in n}
    assert {s.hook_path for s in sites} == towers


@pytest.mark.parametrize("arch_name", ARCHS)
def test_unit_weights_cover_the_method_table(tok, arch_name):
    model = tiny(tok, arch_name)
    lang, vis = get_site(model, "language", 0), get_site(model, "vision", 0)
    names = {(w.name.rsplit(".", 2)[-2] + "." + w.name.rsplit(".", 1)[-1], w.dim) for w in unit_weights(model, lang)}
    assert names == {("gate_proj.weight", 0), ("up_proj.weight", 0), ("down_proj.weight", 1)}
    names = {(w.name.rsplit(".", 2)[-2] + "." + w.name.rsplit(".", 1)[-1], w.dim) for w in unit_weights(model, vis)}
    assert names == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
    for site in (lang, vis):
        for w in unit_weights(model, site):
            assert w.param.shape[w.dim] == site.width
            assert w.param is model.get_parameter(w.name)


def test_unknown_architecture_lists_supported(tok):
    model = tiny(tok, "llava")
    model.config.model_type = "qwen2"
    with pytest.raises(ArchError) as e:
        mlp_sites(model)
    msg = str(e.value)
    assert "Unknown architecture 'qwen2'" in msg and "Did you mean 'qwen2_vl'" in msg
    assert "Available: idefics2, llava, qwen2_vl" in msg
    with pytest.raises(ArchError, match="Unknown tower 'visoin'. Did you mean 'vision'"):
        get_site(tiny(tok, "llava"), "visoin", 0)


def test_a_new_architecture_is_one_registry_entry(tok, monkeypatch):
    """A third architecture = one `register(ArchAdapter(...))`; here a renamed LLaVA whose vision
    tower is read at its last layer."""
    monkeypatch.setattr(arch, "ADAPTERS", dict(ADAPTERS))
    register(dataclasses.replace(ADAPTERS["llava"], model_type="my_vlm", live_vision_layers=lambda cfg, n: n))
    model = tiny(tok, "llava")
    model.config.model_type = "my_vlm"
    assert get_adapter(model).model_type == "my_vlm"
    assert [s.layer for s in mlp_sites(model, towers=("vision",))] == [0, 1]


def test_qwen2_vl_entry_finds_sites():
    model = tiny_qwen2_vl()
    sites = mlp_sites(model)
    assert [(s.tower, s.layer, s.width, s.kind.name) for s in sites] == [
        ("language", 0, 96, "gated"), ("language", 1, 96, "gated"), ("vision", 0, 64, "plain"), ("vision", 1, 64, "plain")]
    assert sites[-1].hook_path == "model.visual.blocks.1.mlp.fc2"


def test_missing_tower_path_is_explained(tok):
    model = tiny(tok, "llava")
    with pytest.raises(ArchError, match="no language layers at .*Pass the full model"):
        mlp_sites(_Wrapped(model))


class _Wrapped(torch.nn.Module):
    """A module with a LLaVA config but another layout."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config


# ----------------------------------------------------------------------------------------------
# The authors' released code, per architecture (docs/method.md, "Mode `released`", "Per architecture")


def test_released_choices_follow_the_authors_hook_registration():
    """prune_utility.register_feedforward_hooks: LLaVA fc1+fc2 and gate/up/down, Idefics2 fc1 only in the
    vision tower; layer names vision 21-23, language 29-31 on both."""
    llava, idefics2, qwen = (get_adapter(t) for t in ("llava", "idefics2", "qwen2_vl"))
    assert llava.released("vision") == llava.released("language") == arch.ReleasedTower(None, 0)
    assert idefics2.released("vision") == arch.ReleasedTower(linears=("fc1",), skip=3)
    assert idefics2.released("language") == arch.ReleasedTower(None, 0)
    assert qwen.released("vision") == qwen.released("language") == arch.ReleasedTower()  # never run by the authors
    # the real towers get the authors' absolute numbers back
    assert llava.released("vision").pool_layers(range(24)) == [21, 22, 23]  # CLIP ViT-L, dead layer 23 included
    assert llava.released("vision").pool_layers(range(23)) == [20, 21, 22]  # the hidden-unit store (no layer 23)
    assert llava.released("language").pool_layers(range(32)) == [29, 30, 31]
    assert idefics2.released("vision").pool_layers(range(27)) == [21, 22, 23]  # SigLIP: not the last three
    assert idefics2.released("language").pool_layers(range(32)) == [29, 30, 31]  # Mistral-7B
    with pytest.raises(ArchError, match="Unknown tower 'visoin'"):
        llava.released("visoin")


@pytest.mark.parametrize("n,want", [(27, [21, 22, 23]), (9, [3, 4, 5]), (7, [1, 2, 3]), (6, [0, 1, 2]),
                                    (5, [0, 1, 2]), (3, [0, 1, 2]), (2, [0, 1]), (1, [0])])
def test_the_authors_vision_window_counts_from_the_end_and_clamps_at_the_first_layer(n, want):
    """Idefics2's vision window: layers n−6..n−4 of n; shorter towers start at layer 0."""
    assert get_adapter("idefics2").released("vision").pool_layers(range(n)) == want


def test_the_window_is_taken_among_the_layers_present():
    """By position among the store's layers (sorted, deduplicated), not by index arithmetic."""
    assert arch.ReleasedTower(skip=3).pool_layers([9, 0, 2, 5, 7, 8, 11, 12, 2]) == [5, 7, 8]
    assert arch.ReleasedTower().pool_layers([4, 1, 9, 6]) == [4, 6, 9]
    assert arch.ReleasedTower().pool_layers([]) == []


def test_released_choices_are_checked_against_the_mlp_kind(monkeypatch):
    monkeypatch.setattr(arch, "ADAPTERS", dict(ADAPTERS))
    with pytest.raises(ArchError, match=r"released_vision.linears must name Linears of its plain MLP \(fc1, fc2\); "
                                        r"got \('gate_proj',\)"):
        dataclasses.replace(ADAPTERS["idefics2"], released_vision=arch.ReleasedTower(linears=("gate_proj",)))
    with pytest.raises(ArchError, match="must be an int >= 0; got -1"):
        arch.ReleasedTower(skip=-1)


def test_released_linears_name_the_tiny_models_linears(tok):
    """The Linears named for Idefics2's vision tower are Linears the extraction hooks (arch.output_sites)."""
    model = tiny(tok, "idefics2")
    hooked = {s.module for s in arch.output_sites(model, mlp_sites(model, towers=("vision",)))}
    assert set(get_adapter(model).released("vision").linears) < hooked == {"fc1", "fc2"}


def test_get_adapter_takes_a_model_type_string(tok):
    assert get_adapter("idefics2") is get_adapter(tiny(tok, "idefics2")) is ADAPTERS["idefics2"]
    with pytest.raises(ArchError, match="Unknown architecture 'idefic2'. Did you mean 'idefics2'"):
        get_adapter("idefic2")
