"""Architecture adapters: the one module that knows where each model keeps its MLP neurons.

Everything else in manu speaks of (tower, layer, unit) (style.md, practice 2). This module answers,
per architecture (keyed by `config.model_type`):

- where the MLP blocks of the language model and of the vision tower are (`TowerLayout`);
- what kind of MLP they are (`MlpKind`): which Linear rows and columns belong to hidden unit i
  (method.md, "Neurons": gated = gate row, up row, down column; plain = fc1 row and bias, fc2 column),
  and which Linear's input is the hidden-unit activation (down_proj / fc2: the hook target);
- which vision layers are dead (method.md: LLaVA reads the vision tower at `vision_feature_layer`,
  -2 for LLaVA-1.5, so later layers never reach the output and are left out);
- how the images the vision tower sees map to the samples of a batch (`ImageLayout`), for
  per-sample vision activations;
- what the authors' released code hard-codes per architecture (`ReleasedTower`: which MLP Linears it
  hooks, which layers its pooled score lands on), for the `released` scoring mode (method.md, "Mode
  `released`", "Per architecture").

Adding an architecture is one `register(ArchAdapter(...))` call; the Qwen2-VL entry at the bottom
is the worked example (its tower paths and an image layout, nothing else; its tiny model, the
`tiny-qwen2vl` preset, and its image-only processor are in manu_core/models.py).

Canonical site names (TransformerLens-style, used in logs and errors): "language.3", "vision.0".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from manu_core.vocab import TOWERS, did_you_mean


class ArchError(ValueError):
    """Unsupported model or bad site request: the message names the rule, the value and the fix."""


# ----------------------------------------------------------------------------------------------
# MLP kinds


@dataclass(frozen=True)
class MlpKind:
    """Which Linear submodules of one MLP block carry hidden unit i.

    `rows`: Linears whose output i is unit i's pre-activation (weight row i, bias entry i).
    `cols`: Linears whose input i is unit i's activation (weight column i); `cols[0]` is the hook
    target, whose forward input (..., width) holds every unit's activation (method.md, "Neurons").
    """

    name: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]

    @property
    def hook_module(self) -> str:
        return self.cols[0]

    @property
    def linears(self) -> tuple[str, ...]:
        """Every Linear of the block in forward order (the released code hooks each one's output)."""
        return (*self.rows, *self.cols)


GATED = MlpKind("gated", rows=("gate_proj", "up_proj"), cols=("down_proj",))  # LLaMA, Mistral, Qwen
PLAIN = MlpKind("plain", rows=("fc1",), cols=("fc2",))  # CLIP, SigLIP, Qwen2-VL vision


@dataclass(frozen=True)
class TowerLayout:
    """Where one tower's transformer blocks are.

    `layers`: dotted paths, from the top-level model, of the ModuleList of blocks; the first that
    exists wins (transformers 5.x layout first; older layouts as fallbacks). `mlp`: the MLP's
    attribute path inside one block. Paths are prefixes, never name suffixes: Idefics2's connector
    also has modules called down_proj, and they are not neurons of either tower.
    """

    layers: tuple[str, ...]
    kind: MlpKind
    mlp: str = "mlp"


# ----------------------------------------------------------------------------------------------
# Images -> samples


@dataclass(frozen=True)
class ImageLayout:
    """How the positions the vision tower's MLPs see map to the samples of a batch.

    The vision MLP input is (N_images, S, d) (LLaVA, Idefics2) or (P, d) with the patches of all
    images concatenated (Qwen2-VL). `image_sample` (N_images,) gives each image's sample index in the
    batch. `positions`: None = every position of every image counts; else a bool mask, (N_images, S)
    for 3-d inputs (Idefics2 patches that are padding are False) or (N_images, P) membership for 2-d
    inputs. A sample's vision activation is the mean over the counted positions of all its images
    (method.md, "Per-sample activation": every patch position of the sample's image(s)).
    """

    image_sample: torch.Tensor  # (N_images,) long
    positions: torch.Tensor | None = None  # (N_images, S) or (N_images, P) bool


def _llava_images(config, inputs: Mapping[str, torch.Tensor]) -> ImageLayout:
    # pixel_values (N_images, C, H, W); CLIP sees (N_images, 1 + patches, d): CLS and every patch
    # count. Each image is image_seq_length <image> tokens of input_ids, in batch order.
    n = inputs["pixel_values"].shape[0]
    per = (inputs["input_ids"] == config.image_token_id).sum(1) // max(int(getattr(config, "image_seq_length", 1)), 1)
    if int(per.sum()) != n:
        raise ArchError(
            f"llava: the batch's <image> tokens account for {int(per.sum())} images but pixel_values holds {n}. "
            "Encode the batch with `prompts.encode` (one <image> per multimodal sample) so they agree."
        )
    return ImageLayout(torch.repeat_interleave(torch.arange(per.numel()), per))


def _idefics2_images(config, inputs: Mapping[str, torch.Tensor]) -> ImageLayout:
    # pixel_values (B, max_images, C, H, W). The model drops images that are all zeros (padding
    # images) before the vision tower and masks patches that are padding (pixel_attention_mask);
    # this replays both rules of Idefics2Model.get_image_features on the host, before the forward.
    pv = inputs["pixel_values"]
    b, m = pv.shape[:2]
    real = (pv != 0).flatten(2).any(-1).flatten()  # (B * max_images,)
    image_sample = torch.arange(b).repeat_interleave(m)[real]  # (N_images,)
    pam = inputs.get("pixel_attention_mask")
    if pam is None:
        return ImageLayout(image_sample)
    p = config.vision_config.patch_size
    pam = pam.reshape(b * m, *pam.shape[2:])[real].bool()  # (N_images, H, W)
    patch_ok = pam.unfold(1, p, p).unfold(2, p, p).flatten(3).all(-1).flatten(1)  # (N_images, S)
    return ImageLayout(image_sample, None if bool(patch_ok.all()) else patch_ok)


def _qwen2_vl_images(config, inputs: Mapping[str, torch.Tensor]) -> ImageLayout:
    # The vision blocks see (P, d): the patches of all images concatenated, t*h*w per image, and
    # each image becomes t*h*w / merge^2 image tokens, in batch order.
    sizes = inputs["image_grid_thw"].prod(-1)  # (N_images,) patches per image
    tokens = sizes // config.vision_config.spatial_merge_size**2  # (N_images,)
    per = (inputs["input_ids"] == config.image_token_id).sum(1)  # (B,) image tokens per sample
    if int(per.sum()) != int(tokens.sum()):
        raise ArchError(
            f"qwen2_vl: the batch has {int(per.sum())} image tokens but image_grid_thw accounts for "
            f"{int(tokens.sum())}. Encode the batch with its processor so they agree."
        )
    image_sample = torch.searchsorted(torch.cumsum(per, 0), torch.cumsum(tokens, 0) - tokens, right=True)
    offsets = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(int(sizes.sum()))
    member = (pos[None, :] >= offsets[:, None]) & (pos[None, :] < (offsets + sizes)[:, None])  # (N, P)
    return ImageLayout(image_sample, member)


# ----------------------------------------------------------------------------------------------
# Dead layers


def _llava_live_vision_layers(config, n_layers: int) -> int:
    """Number of leading vision layers whose output LLaVA uses.

    LLaVA reads `hidden_states[k]` of the vision tower for each k in `vision_feature_layer` (an int
    or a list); hidden_states[0] is the embedding output and hidden_states[k] the output of layer
    k-1, so layers 0..k-1 are live. -2 with 24 layers: k = 23, layer 23 (the last) is dead.
    """
    v = config.vision_feature_layer
    ks = [v] if isinstance(v, int) else list(v)
    live = 0
    for k in ks:
        kk = k if k >= 0 else n_layers + 1 + k
        if not 0 <= kk <= n_layers:
            raise ArchError(
                f"vision_feature_layer must index the vision tower's {n_layers + 1} hidden states; got {k}. "
                "Fix the model config."
            )
        live = max(live, kk)
    return live


def _all_live(config, n_layers: int) -> int:
    return n_layers


# ----------------------------------------------------------------------------------------------
# The authors' released code, per architecture


POOL_WINDOW = 3  # the released code stores every layer under three layers' names (method.md, pool_layers)


@dataclass(frozen=True)
class ReleasedTower:
    """What the authors' released code (github franciscoliu/MANU, prune/prune_utility.py,
    `register_feedforward_hooks`) hard-codes for one tower of one architecture; the `released` scoring
    mode follows it by default (option sites="authors"; method.md, "Mode `released`", "Per architecture").

    `linears`: the MLP Linears whose outputs it hooks (option linear_outputs); None: every one of the
    block (`MlpKind.linears`). `skip`: its layer names are absolute indices (vision 21-23, language
    29-31 on both of its architectures), here counted from the end of the tower: the pooled score
    (option pool_layers) lands on the POOL_WINDOW layers that end `skip` layers before the tower's
    last, so 0 is "the last three". Both defaults are the mode's rule for an architecture the authors
    never ran (sites="uniform" applies them everywhere).
    """

    linears: tuple[str, ...] | None = None
    skip: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.skip, int) or self.skip < 0:
            raise ArchError(f"ReleasedTower.skip counts layers back from the tower's last, so it must be an int >= 0; "
                            f"got {self.skip!r}.")

    def pool_layers(self, layers) -> list[int]:
        """The layers, among `layers` (the tower's layers present in the store), that the pooled score
        lands on: the POOL_WINDOW of them ending `skip` before the last. A tower too short for that
        (fewer than skip + POOL_WINDOW layers: a tiny stand-in) keeps a window of POOL_WINDOW starting
        at its first layer; one of at most POOL_WINDOW layers gives them all."""
        ordered = sorted(set(layers))
        start = max(0, len(ordered) - POOL_WINDOW - self.skip)
        return ordered[start : start + POOL_WINDOW]


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ArchAdapter:
    """What manu needs to know about one architecture (keyed by `config.model_type`)."""

    model_type: str
    language: TowerLayout
    vision: TowerLayout
    image_layout: Callable[[object, Mapping[str, torch.Tensor]], ImageLayout]
    live_vision_layers: Callable[[object, int], int] = _all_live
    backbone: str = "model"  # submodule that runs everything but the LM head (extraction skips the head)
    released_language: ReleasedTower = ReleasedTower()  # the authors' hard-coded choices (ReleasedTower)
    released_vision: ReleasedTower = ReleasedTower()

    def __post_init__(self) -> None:
        for name in TOWERS:
            linears, kind = self.released(name).linears, self.tower(name).kind
            if linears is not None and (not linears or set(linears) - set(kind.linears)):
                raise ArchError(f"{self.model_type}: released_{name}.linears must name Linears of its {kind.name} MLP "
                                f"({', '.join(kind.linears)}); got {linears!r}. Use None for every one.")

    def lora_targets(self, model) -> str:
        """peft `target_modules` regex: the attention and MLP projections of the language model's
        blocks (the benchmark's LoRA: the language model only), by this model's real path."""
        found = _resolve(model, self.language.layers)
        if found is None:
            raise ArchError(f"{self.model_type}: no language layers at {' or '.join(self.language.layers)}; "
                            "update the TowerLayout in manu_core/arch.py for this transformers version.")
        path = re.escape(found[0])
        return rf"^{path}\.\d+\.(self_attn\.(q|k|v|o)_proj|{self.language.mlp}\.(gate|up|down)_proj)$"

    def tower(self, name: str) -> TowerLayout:
        if name not in TOWERS:
            raise ArchError(_unknown("tower", name, TOWERS))
        return self.language if name == "language" else self.vision

    def released(self, name: str) -> ReleasedTower:
        """The authors' released code's choices for tower `name` (ReleasedTower)."""
        if name not in TOWERS:
            raise ArchError(_unknown("tower", name, TOWERS))
        return self.released_language if name == "language" else self.released_vision


ADAPTERS: dict[str, ArchAdapter] = {}


def register(adapter: ArchAdapter) -> ArchAdapter:
    """Add (or replace) the adapter for `adapter.model_type`."""
    ADAPTERS[adapter.model_type] = adapter
    return adapter


register(ArchAdapter(
    model_type="llava",  # LLaVA-1.5: Llama + CLIP
    language=TowerLayout(("model.language_model.layers", "language_model.model.layers"), GATED),
    vision=TowerLayout(("model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers"), PLAIN),
    image_layout=_llava_images,
    live_vision_layers=_llava_live_vision_layers,
    # The released code hooks fc1 and fc2, gate/up/down, and names vision 21-23, language 29-31: the
    # last three of CLIP ViT-L's 24 layers and of Vicuna-7B's 32, hence the defaults (skip 0). The
    # hidden-unit store leaves the dead vision layer 23 out, so there the last three are 20-22
    # (method.md, pool_layers).
))
register(ArchAdapter(
    model_type="idefics2",  # Mistral + SigLIP-like encoder
    language=TowerLayout(("model.text_model.layers",), GATED),
    vision=TowerLayout(("model.vision_model.encoder.layers",), PLAIN),
    image_layout=_idefics2_images,  # the connector reads last_hidden_state: every vision layer is live
    # The released code hooks only fc1 of the vision MLPs (its fc2 hooks are commented out) and the
    # same names as on LLaVA: language 29-31, the last three of Mistral-7B's 32 (skip 0), but vision
    # 21-23 of SigLIP's 27 layers (0-26), which end 3 layers before the last (skip 3).
    released_vision=ReleasedTower(linears=("fc1",), skip=3),
))
register(ArchAdapter(
    model_type="qwen2_vl",  # Qwen2 + Qwen2-VL's ViT: the one-entry example of a third architecture (`tiny-qwen2vl`)
    # The authors never ran it: the released mode's defaults (every Linear, the last three layers).
    language=TowerLayout(("model.language_model.layers",), GATED),
    vision=TowerLayout(("model.visual.blocks",), PLAIN),
    image_layout=_qwen2_vl_images,  # the merger reads the last block: every vision layer is live
))


def _unknown(kind: str, value: object, available) -> str:
    available = sorted(str(a) for a in available)
    hint = did_you_mean(value, available)
    return f"Unknown {kind} {value!r}.{hint} Available: {', '.join(available)}."


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model, its config, or a `config.model_type` string (e.g. "idefics2")."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ArchError(
            _unknown("architecture", model_type, ADAPTERS)
            + " (from config.model_type). Add one with `manu_core.arch.register(ArchAdapter(...))`."
        )
    return ADAPTERS[model_type]


# ----------------------------------------------------------------------------------------------
# Sites


@dataclass(frozen=True)
class MlpSite:
    """One MLP layer's hidden units: units 0..width-1 of (tower, layer). With `module` set, the
    outputs of that Linear of the block instead (`output_sites`: the released code's hook sites)."""

    tower: str
    layer: int
    path: str  # dotted path of the MLP module, e.g. "model.language_model.layers.3.mlp"
    kind: MlpKind
    width: int  # number of hidden units (d_mlp); of a `module` site, the Linear's out_features
    live: bool = True  # False: a vision layer whose output the model never reads
    module: str | None = None  # None: the hidden units; else a Linear of kind.linears, hooked on its output

    @property
    def name(self) -> str:
        return f"{self.tower}.{self.layer}" + (f".{self.module}" if self.module else "")

    @property
    def hook_path(self) -> str:
        """The Linear hooked: for hidden units the one whose input they are (down_proj / fc2, a
        forward pre-hook); for a `module` site that Linear (a forward hook on its output)."""
        return f"{self.path}.{self.module or self.kind.hook_module}"


def _resolve(model, paths: tuple[str, ...]):
    for path in paths:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None


def _tower_sites(model, adapter: ArchAdapter, tower: str) -> list[MlpSite]:
    layout = adapter.tower(tower)
    found = _resolve(model, layout.layers)
    if found is None:
        raise ArchError(
            f"{adapter.model_type}: no {tower} layers at {' or '.join(layout.layers)} in {type(model).__name__}. "
            "Pass the full model (e.g. LlavaForConditionalGeneration), or update the TowerLayout in "
            "manu_core/arch.py for this transformers version."
        )
    path, blocks = found
    n = len(blocks)
    live = n if tower == "language" else adapter.live_vision_layers(model.config, n)
    sites = []
    for i in range(n):
        mlp_path = f"{path}.{i}.{layout.mlp}"
        mlp = model.get_submodule(mlp_path)
        widths = {getattr(mlp, r).out_features for r in layout.kind.rows}
        widths |= {getattr(mlp, c).in_features for c in layout.kind.cols}
        assert len(widths) == 1, f"{mlp_path}: inconsistent hidden widths {widths}"
        sites.append(MlpSite(tower, i, mlp_path, layout.kind, widths.pop(), live=i < live))
    return sites


def mlp_sites(model, *, towers: tuple[str, ...] = TOWERS, live_only: bool = True) -> list[MlpSite]:
    """Every MLP layer of the given towers, in (tower, layer) order; dead vision layers left out
    unless `live_only=False` (method.md, "Neurons")."""
    adapter = get_adapter(model)
    out = []
    for t in towers:
        out += [s for s in _tower_sites(model, adapter, t) if s.live or not live_only]
    return out


def output_sites(model, sites: list[MlpSite]) -> list[MlpSite]:
    """The Linear-output sites of `sites` (hidden-unit sites): one per Linear of each block, in
    (tower, layer, kind.linears) order, as the authors' released code hooks them (gated: gate_proj,
    up_proj, down_proj; plain: fc1, fc2). down_proj / fc2 outputs are residual-stream channels."""
    out = []
    for s in sites:
        mlp = model.get_submodule(s.path)
        out += [MlpSite(s.tower, s.layer, s.path, s.kind, getattr(mlp, m).out_features, s.live, module=m)
                for m in s.kind.linears]
    return out


def get_site(model, tower: str, layer: int, *, live_only: bool = False) -> MlpSite:
    """The site of (tower, layer); dead layers are found too unless `live_only`."""
    if tower not in TOWERS:
        raise ArchError(_unknown("tower", tower, TOWERS))
    sites = {s.layer: s for s in mlp_sites(model, towers=(tower,), live_only=live_only)}
    if layer not in sites:
        span = f"{min(sites)}..{max(sites)}" if sites else "none"
        raise ArchError(
            f"{tower} layer {layer} does not exist in this {get_adapter(model).model_type} model "
            f"({tower} layers{' (live)' if live_only else ''}: {span}). Check that the request was made for this model."
        )
    return sites[layer]


@dataclass(frozen=True)
class UnitWeight:
    """A parameter and the axis along which unit i is its i-th slice."""

    name: str  # dotted parameter name, e.g. "model.language_model.layers.0.mlp.down_proj.weight"
    param: torch.nn.Parameter
    dim: int


def unit_weights(model, site: MlpSite) -> tuple[UnitWeight, ...]:
    """Every parameter slice that belongs to the site's hidden units (method.md, "Neurons" table):
    rows (weight dim 0, and the bias) of `kind.rows`, columns (weight dim 1) of `kind.cols`. Zeroing
    index i of each prunes unit i. Biases of the `cols` Linears belong to no unit and are kept."""
    mlp = model.get_submodule(site.path)
    out = []
    for r in site.kind.rows:
        lin = getattr(mlp, r)
        out.append(UnitWeight(f"{site.path}.{r}.weight", lin.weight, 0))
        if lin.bias is not None:
            out.append(UnitWeight(f"{site.path}.{r}.bias", lin.bias, 0))
    for c in site.kind.cols:
        out.append(UnitWeight(f"{site.path}.{c}.weight", getattr(mlp, c).weight, 1))
    return tuple(out)
