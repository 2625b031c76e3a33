"""Configuration of Phi-3.5-vision, reading and writing the official `config.json` format.

The released `config.json` (model_type "phi3_v") is a Phi-3-mini text config plus two dicts
that switch on the vision side (`embd_layer`, `img_processor`) and a LongRoPE block written in
the old `rope_scaling = {"type": "su", ...}` form. transformers 5 neither knows "phi3_v" nor
accepts "su" scaling without `original_max_position_embeddings` inside the block, so this class
translates on the way in and back to the official layout on the way out: a finetuned output
has the same keys as the released config and loads wherever the released one loads.

Differences from the official class, all deliberate:
- the CLIP tower is described by an optional `vision_config` (a CLIP vision config). Absent,
  it is CLIP ViT-L/14-336, which the official code hard-codes; present, tiny models become
  possible. It is written to config.json only when it differs from CLIP-L.
- `_attn_implementation` stored in the file (the release says "flash_attention_2") is not
  obeyed: the backend is chosen at load time (`attn_implementation=`, SDPA by default), so the
  released config loads on machines without flash-attn.

One class serves both releases of the architecture, Phi-3.5-vision-instruct and
Phi-3-vision-128k-instruct (docs/checkpoint_format.md §5). Their code differs in two numeric rules, chosen
by `model_family`:
- "phi3.5v": LongRoPE switches to the long factors when the key length (cache + new tokens,
  padding included) exceeds original_max_position_embeddings, and generate() drops the KV cache
  once when the sequence crosses that length;
- "phi3v-128k": the switch compares max(position_ids) + 1 instead, and the cache is kept.
The released config.json files do not name their model, so a config without `model_family` is
classified by `detect_model_family` (see there). A config that needs the field to be read right
(every 128k one, and a 3.5 one that would otherwise look like 128k) writes it to config.json;
a plain 3.5 config stays key-for-key the released file.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config
from transformers.configuration_utils import SubConfigSpec

__all__ = [
    "Phi3VConfig",
    "CLIP_L_336_VISION_CONFIG",
    "OFFICIAL_AUTO_MAP",
    "OFFICIAL_CLIP_NAME",
    "MODEL_FAMILIES",
    "PHI3_5V",
    "PHI3V_128K",
    "detect_model_family",
]

PHI3_5V = "phi3.5v"
PHI3V_128K = "phi3v-128k"
MODEL_FAMILIES = (PHI3_5V, PHI3V_128K)

# What only the Phi-3-vision-128k release's config.json carries (3.5: 262144 and
# "Phi-3.5-vision-instruct"). Its other differences -- its own LongRoPE factor values and the
# absent embd_pdrop / resid_pdrop / pad_token_id keys -- do not identify it reliably.
_128K_SLIDING_WINDOW = 131072
_128K_NAME = "phi-3-vision-128k"
# Keys the 128k config.json leaves out, with the class defaults its code then applies.
_128K_OMITTED_DEFAULTS = {"embd_pdrop": 0.0, "resid_pdrop": 0.0, "pad_token_id": 32000}


def detect_model_family(config_dict: dict[str, Any]) -> str:
    """Which release's rules a config.json means: "phi3v-128k" or "phi3.5v".

    The rule, in order:
    1. an explicit `model_family` key wins (our outputs write it when it matters);
    2. `sliding_window` 131072 -> "phi3v-128k" (the 128k release; Phi-3.5-vision has 262144);
    3. a `_name_or_path` naming Phi-3-vision-128k (the release file says
       "Phi-3-vision-128k-instruct"; files saved by the hub code carry the hub id) -> "phi3v-128k";
    4. otherwise "phi3.5v".
    Only the file's own `_name_or_path` counts, not the directory it is loaded from.
    """
    family = config_dict.get("model_family")
    if family is not None:
        return family
    if config_dict.get("sliding_window") == _128K_SLIDING_WINDOW:
        return PHI3V_128K
    if _128K_NAME in str(config_dict.get("_name_or_path") or "").lower():
        return PHI3V_128K
    return PHI3_5V

OFFICIAL_CLIP_NAME = "openai/clip-vit-large-patch14-336"

# What the official code hard-codes for its image encoder (CLIP ViT-L/14 at 336 px).
CLIP_L_336_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
}

# The released config.json points the Auto classes at the hub code. We keep writing it so a
# saved directory is byte-for-byte the official layout; importing `phi3v` registers native
# classes, which transformers prefers over `auto_map` when trust_remote_code is not given.
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_phi3_v.Phi3VConfig",
    "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
}

# The only image-embedding variant ever released; the official code asserts most of it too.
_RELEASED_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
_RELEASED_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": OFFICIAL_CLIP_NAME,
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}


@strict
class Phi3VConfig(Phi3Config):
    r"""
    Configuration for [`Phi3VForCausalLM`]: a Phi-3-mini decoder plus a CLIP image encoder with
    Phi-3.5-vision's HD crop transform and MLP projector.

    Args (on top of [`Phi3Config`]):
        embd_layer (`dict` or `"default"`): the official switch for the vision side. A dict (the
            released value is `{"embedding_cls": "image", "hd_transform_order": "sub_glb",
            "projection_cls": "mlp", "use_hd_transform": True, "with_learnable_separator": True}`)
            builds the image encoder; the string "default" gives a text-only model.
        img_processor (`dict`): `{"name": "clip_vision_model", "model_name": ..., "image_dim_out":
            ..., "num_img_tokens": 144}` plus optional `layer_idx` (default -2: features of the
            second-to-last CLIP layer) and `type_feature` ("patch": CLS token dropped).
        vision_config (`dict` or `CLIPVisionConfig`, optional): the CLIP tower. Defaults to
            CLIP ViT-L/14-336, as the official code.
        model_family (`"phi3.5v"` or `"phi3v-128k"`, optional): which release's LongRoPE switch and
            generation-cache rule apply (module docstring). Unset, it is decided by
            `detect_model_family` from the other keys.

    Example:

    ```python
    >>> from phi3v import Phi3VConfig, Phi3VForCausalLM
    >>> config = Phi3VConfig.from_pretrained("microsoft/Phi-3.5-vision-instruct")  # doctest: +SKIP
    >>> tiny = Phi3VConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...     intermediate_size=128, vision_config={"hidden_size": 32, "num_hidden_layers": 2,
    ...     "num_attention_heads": 2, "intermediate_size": 64})
    >>> model = Phi3VForCausalLM(tiny)
    ```
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_L_336_VISION_CONFIG)
    }

    embd_layer: dict | str = "default"
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    model_family: Literal["phi3.5v", "phi3v-128k"] | None = None

    def __post_init__(self, **kwargs):
        # The released file asks for flash-attention-2; see the module docstring.
        kwargs.pop("_attn_implementation", None)
        # The file's own name (not the load path, which arrives as `name_or_path`).
        file_name = kwargs.get("_name_or_path")
        kwargs = _official_rope_to_parameters(self, kwargs)
        if isinstance(self.vision_config, dict):
            # A partial dict (e.g. a tiny model saying only its widths) completes from CLIP-L.
            self.vision_config = {**CLIP_L_336_VISION_CONFIG, **self.vision_config}
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(OFFICIAL_AUTO_MAP)
        if self.model_family is None:
            self.model_family = detect_model_family(
                {"sliding_window": self.sliding_window, "_name_or_path": file_name}
            )
        if self.model_family not in MODEL_FAMILIES:
            raise ValueError(f"model_family must be one of {MODEL_FAMILIES}, got {self.model_family!r}")
        self._validate_vision()

    # -- validation -----------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        """Whether this config describes the image encoder (official rule: embd_layer is a dict)."""
        return isinstance(self.embd_layer, dict)

    def _validate_vision(self) -> None:
        if isinstance(self.embd_layer, str):
            if self.embd_layer != "default":
                raise ValueError(f"embd_layer must be a dict or 'default', got {self.embd_layer!r}")
            return
        self.embd_layer = {**_RELEASED_EMBD_LAYER, **self.embd_layer}
        for key, released in _RELEASED_EMBD_LAYER.items():
            value = self.embd_layer[key]
            if value != released:
                raise ValueError(
                    f"embd_layer[{key!r}] = {value!r} is not supported: only the released "
                    f"Phi-3.5-vision layout ({key}={released!r}) is implemented."
                )
        if self.img_processor is None:
            self.img_processor = dict(_RELEASED_IMG_PROCESSOR)
            self.img_processor["image_dim_out"] = self.vision_config.hidden_size
        if not isinstance(self.img_processor, dict) or self.img_processor.get("name") != "clip_vision_model":
            raise ValueError(
                f"img_processor must be a dict with name 'clip_vision_model', got {self.img_processor!r}"
            )
        missing = {"model_name", "image_dim_out", "num_img_tokens"} - set(self.img_processor)
        if missing:
            raise ValueError(f"img_processor is missing {sorted(missing)}")
        if self.img_processor["image_dim_out"] != self.vision_config.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out ({self.img_processor['image_dim_out']}) must equal "
                f"vision_config.hidden_size ({self.vision_config.hidden_size})"
            )
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise ValueError("img_processor.type_feature: only 'patch' (CLS token dropped) is supported")
        n_layers = self.vision_config.num_hidden_layers
        layer_idx = self.img_processor.get("layer_idx", -2)
        if not -n_layers <= layer_idx < 0 and not 0 < layer_idx <= n_layers:
            raise ValueError(
                f"img_processor.layer_idx={layer_idx} is outside the CLIP tower's "
                f"{n_layers} layers (use -1..-{n_layers}, or 1..{n_layers})"
            )
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        grid = image_size // patch_size
        if image_size % patch_size or grid % 2:
            raise ValueError(
                f"vision_config: image_size {image_size} / patch_size {patch_size} must give an even "
                "patch grid (the 2x2 merge needs it; CLIP-L/14-336 gives 24)"
            )
        expected_tokens = (grid // 2) ** 2
        if self.img_processor["num_img_tokens"] != expected_tokens:
            raise ValueError(
                f"img_processor.num_img_tokens={self.img_processor['num_img_tokens']} but the vision "
                f"tower gives {expected_tokens} tokens per crop"
            )

    @property
    def vision_feature_layer(self) -> int:
        """Number of CLIP encoder layers whose output is used (official `layer_idx`, default -2)."""
        layer_idx = self.img_processor.get("layer_idx", -2)
        n_layers = self.vision_config.num_hidden_layers
        return n_layers + 1 + layer_idx if layer_idx < 0 else layer_idx

    # -- writing the official layout --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self._to_official(super().to_dict(), diff=False)

    def to_diff_dict(self) -> dict[str, Any]:
        return self._to_official(super().to_diff_dict(), diff=True)

    def _to_official(self, out: dict[str, Any], diff: bool) -> dict[str, Any]:
        params = out.pop("rope_parameters", None) or copy.deepcopy(self.rope_parameters)
        out["rope_theta"] = params.get("rope_theta", 10000.0)
        if params.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "long_factor": list(params["long_factor"]),
                "short_factor": list(params["short_factor"]),
                "type": "su",
            }
        else:
            out["rope_scaling"] = None
        out.pop("partial_rotary_factor", None)
        family = out.pop("model_family", None) or detect_model_family(out)
        if family == PHI3V_128K or family != detect_model_family(out):
            out["model_family"] = family
        if diff and family == PHI3V_128K:
            # The 128k release's key set: leave out what it leaves out while it holds the default.
            for key, default in _128K_OMITTED_DEFAULTS.items():
                if out.get(key, default) == default:
                    out.pop(key, None)
        if diff and "dtype" in out:  # config.json: the released files (and older loaders) say torch_dtype
            out["torch_dtype"] = out.pop("dtype")
        vision = self.vision_config
        if vision is None or all(getattr(vision, k) == v for k, v in CLIP_L_336_VISION_CONFIG.items()):
            out.pop("vision_config", None)
        elif diff:
            # Write the whole tower description, not a diff against CLIP's generic defaults.
            out["vision_config"] = {k: getattr(vision, k) for k in CLIP_L_336_VISION_CONFIG}
        return dict(sorted(out.items()))


def _official_rope_to_parameters(config: Phi3VConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turns the released `rope_scaling={"type": "su", ...}` into transformers 5 `rope_parameters`.

    "su" is what the Phi-3 code called LongRoPE; transformers names it "longrope" and wants the
    pre-training length inside the block.
    """
    scaling = kwargs.pop("rope_scaling", None)
    if scaling is None and isinstance(config.rope_parameters, dict) and config.rope_parameters:
        return kwargs
    if scaling is None:
        return kwargs
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {scaling!r}")
    scaling = dict(scaling)
    kind = scaling.pop("type", None) or scaling.pop("rope_type", None)
    if kind in ("su", "longrope"):
        unknown = set(scaling) - {"short_factor", "long_factor", "original_max_position_embeddings"}
        if unknown or not {"short_factor", "long_factor"} <= set(scaling):
            raise ValueError(
                "rope_scaling of type 'su' needs exactly short_factor and long_factor, "
                f"got keys {sorted(scaling)}"
            )
        config.rope_parameters = {
            "rope_type": "longrope",
            "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]),
            "original_max_position_embeddings": config.original_max_position_embeddings,
            # Same ratio transformers would derive; stating it keeps the library from warning.
            "factor": config.max_position_embeddings / config.original_max_position_embeddings,
            "rope_theta": kwargs.pop("rope_theta", 10000.0),
        }
        return kwargs
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported: Phi-3.5-vision was released with 'su' (LongRoPE)"
    )
