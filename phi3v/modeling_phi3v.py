"""Phi-3.5-vision on transformers' own Phi-3 decoder layers and CLIP encoder blocks.

Module names reproduce the official checkpoint exactly (`model.embed_tokens`,
`model.layers.N...`, `model.vision_embed_tokens.img_processor.vision_model...`, `glb_GN`,
`sub_GN`, `img_projection.{0,2}`, `lm_head`), so the released safetensors load without any key
mapping and `save_pretrained` writes the same 592-name layout (scaled to the layer counts).
The official `vision_embed_tokens.wte` is only an alias of `embed_tokens` and is not stored,
so it does not exist here.

What follows the official numerics to the letter is marked "official"; what deliberately
differs (and cannot change results on valid input) is marked "deliberate":
- deliberate: padding crops (beyond 1 + h/336 * w/336 per image) never enter CLIP;
- deliberate: CLIP stops after the layer whose output is used (layer -2); the last layer
  and the post-layernorm are kept as parameters but never run, so never receive gradients;
- deliberate: image positions that do not match the image features, and missing
  pixel_values, raise a ValueError naming both counts instead of an indexing error;
- deliberate: negative label ids (image positions) are ignored by the loss instead of
  crashing cross-entropy.

Two additions the official code lacks, for rows that hold several sequences (padding-free
packing, preference pairs sharing one prompt, recipe/pairs.py): `sequence_lengths` gives each
token the LongRoPE factors of its own sequence run alone; `image_hidden_states` (the name
transformers' Idefics3 uses, in and out) returns the projected image features of a forward and
takes them back in another, so a second forward over the same images (a DPO reference model
whose vision side is the policy's) does not run the vision tower again.

The same classes compute Phi-3-vision-128k-instruct when `config.model_family` is "phi3v-128k"
(docs/checkpoint_format.md §5): its LongRoPE switch (`Phi3VRotaryEmbedding`) and its generation cache
(`prepare_inputs_for_generation`) follow that release's code. Deliberate: its forward's
in-place clamping of the caller's input_ids is not copied (3.5's out-of-place one is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3DecoderLayer, Phi3RMSNorm
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_phi3v import PHI3V_128K, Phi3VConfig

__all__ = [
    "Phi3VPreTrainedModel",
    "Phi3VModel",
    "Phi3VForCausalLM",
    "Phi3VModelOutputWithPast",
    "Phi3VCausalLMOutputWithPast",
    "Phi3VImageEmbedding",
    "Phi3VRotaryEmbedding",
    "real_crop_counts",
    "packed_sequence_lengths",
]


def real_crop_counts(image_sizes: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Crops that carry pixels for each image: 1 global + (h / crop) * (w / crop) local ones.

    `image_sizes` holds the padded HD size [h, w] of every image (multiples of `crop_size`), as
    the image processor writes it. Everything after these crops in `pixel_values` is padding.
    """
    image_sizes = image_sizes.to(torch.long)
    return 1 + (image_sizes[:, 0] // crop_size) * (image_sizes[:, 1] // crop_size)


def packed_sequence_lengths(position_ids: torch.Tensor) -> torch.Tensor | None:
    """For a padding-free batch (recipe/packing.py: every row starts at position 0, and position
    ids restart at 0 for each example packed after it), the length of each token's example,
    shaped like `position_ids`; None when every row holds one sequence."""
    starts = position_ids == 0
    if position_ids.shape[-1] < 2 or not bool(starts[:, 0].all()) or not bool(starts[:, 1:].any()):
        return None
    example = starts.reshape(-1).cumsum(0) - 1  # index of each token's example, across rows
    return torch.bincount(example)[example].view_as(position_ids)


@dataclass
class Phi3VModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the projected image features the forward used (None without
    images), to be passed back as `image_hidden_states`."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class Phi3VCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the projected image features the forward used."""

    image_hidden_states: torch.FloatTensor | None = None


class Phi3VRotaryEmbedding(nn.Module):
    """Rotary embedding with Phi-3's LongRoPE ("su") factor choice, by the checkpoint's release.

    Official Phi-3.5-vision: the long factors are used when the *key length* (cached + new
    tokens, padding included) exceeds `original_max_position_embeddings`. transformers' own
    Phi-3 decides on the largest position id instead, which differs for left-padded batches,
    hence this class. (The official flash-attention path switches one token earlier; we follow
    the eager convention everywhere, which is also the one generate()'s cache reset uses.)
    Official Phi-3-vision-128k (`config.model_family == "phi3v-128k"`): the switch compares
    max(position_ids) + 1 over the whole batch, in every forward.
    Both: cos and sin are always scaled by sqrt(1 + ln(max/original) / ln(original)), in the
    short regime too.
    """

    def __init__(self, config: Phi3VConfig, device=None):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.original_max_position_embeddings = config.original_max_position_embeddings
        short_inv_freq, long_inv_freq, self.attention_scaling = self.compute_inv_freqs(config, device)
        self.register_buffer("short_inv_freq", short_inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freqs(config: Phi3VConfig, device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type == "longrope":
            longrope = ROPE_INIT_FUNCTIONS["longrope"]
            short, scaling = longrope(config, device)
            long, _ = longrope(config, device, seq_len=config.original_max_position_embeddings + 1)
            return short, long, scaling
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported by Phi-3.5-vision")
        head_dim = config.hidden_size // config.num_attention_heads
        base = config.rope_parameters["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        return inv, inv.clone(), 1.0

    def switch_length(self, position_ids: torch.Tensor, key_length: int) -> int:
        """The length compared with original_max_position_embeddings, by the release's rule."""
        if self.config.model_family == PHI3V_128K:
            return int(position_ids.max()) + 1
        return key_length

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, key_length: int):
        """cos, sin for `position_ids`; `key_length` = cached + new tokens of this forward."""
        use_long = (
            self.rope_type == "longrope"
            and self.switch_length(position_ids, key_length) > self.original_max_position_embeddings
        )
        return self._cos_sin(x, position_ids, use_long)

    @torch.no_grad()
    def per_sequence(self, x: torch.Tensor, position_ids: torch.Tensor, sequence_lengths: torch.Tensor):
        """cos, sin where every token gets the factors of its own sequence run alone, unpadded
        (`sequence_lengths`: that sequence's length, shaped like `position_ids`). For one unpadded
        sequence both releases' rules agree: the long factors iff its length exceeds the original
        context."""
        long = sequence_lengths > self.original_max_position_embeddings
        if self.rope_type != "longrope" or not bool(long.any()):
            return self._cos_sin(x, position_ids, False)
        if bool(long.all()):
            return self._cos_sin(x, position_ids, True)
        (cos_s, sin_s), (cos_l, sin_l) = (self._cos_sin(x, position_ids, use) for use in (False, True))
        long = long[..., None]
        return torch.where(long, cos_l, cos_s), torch.where(long, sin_l, sin_s)

    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor, use_long: bool):
        inv_freq = self.long_inv_freq if use_long else self.short_inv_freq
        if inv_freq.dtype != torch.float32:
            # model.to(bf16)/.half() rounded the buffers; official code always has fp32 frequencies.
            short, long, _ = self.compute_inv_freqs(self.config, x.device)
            inv_freq = long if use_long else short
        inv_freq = inv_freq.to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class Phi3VCLIPVisionTransformer(nn.Module):
    """CLIP's vision transformer, laid out under the official names (`vision_model.*`).

    Built from transformers' CLIP blocks (so every attention backend works) but run only up to
    the layer whose output Phi-3.5-vision uses.
    """

    def __init__(self, vision_config):
        super().__init__()
        self.config = vision_config
        self.embeddings = CLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = CLIPEncoder(vision_config)
        # Never used for the output (official: features come from an inner layer); kept so
        # checkpoints keep the official key set.
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:num_layers]:
            hidden_states = layer(hidden_states, None)
        return hidden_states


class Phi3VVisionTower(nn.Module):
    """Holder giving the official `img_processor.vision_model.` prefix."""

    def __init__(self, vision_config):
        super().__init__()
        self.vision_model = Phi3VCLIPVisionTransformer(vision_config)


class Phi3VImageEmbedding(nn.Module):
    """CLIP features of the HD crops, assembled into Phi-3.5-vision's token sequence.

    Per image (official, "sub_glb" order): the local crops tiled into a (12*hc) x (12*wc) grid
    of 2x2-merged patch features with `sub_GN` closing every row, then `glb_GN`, then the global
    crop as 12 rows of 12 features each closed by `sub_GN` -> projected by Linear-GELU-Linear.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision_config = config.vision_config
        self.crop_size = vision_config.image_size
        self.patch_grid = vision_config.image_size // vision_config.patch_size  # 24 for CLIP-L/14-336
        self.merged_grid = self.patch_grid // 2  # 12
        self.num_layers = config.vision_feature_layer
        dim = vision_config.hidden_size * 4  # 2x2 merge concatenates four patch features
        self.img_processor = Phi3VVisionTower(vision_config)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        # Never run, so never trained: marking them frozen keeps optimizers from holding state
        # for them and DDP from waiting for their gradients.
        for module in self.unused_modules():
            module.requires_grad_(False)

    def unused_modules(self) -> list[nn.Module]:
        """CLIP layers after the one whose output is used, and the post-layernorm."""
        vision = self.img_processor.vision_model
        return [*vision.encoder.layers[self.num_layers :], vision.post_layernorm]

    def num_tokens(self, image_sizes: torch.Tensor) -> torch.Tensor:
        """Image tokens each image occupies in input_ids (the processor's `num_img_tokens`)."""
        rows = image_sizes[:, 0].long() // self.crop_size
        cols = image_sizes[:, 1].long() // self.crop_size
        g = self.merged_grid
        return rows * g * (cols * g + 1) + 1 + g * (g + 1)

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 3, 336, 336) crops -> (n, 12, 12, 4*dim) 2x2-merged CLIP patch features."""
        features = self.img_processor.vision_model(crops, self.num_layers)[:, 1:]  # drop CLS
        n, _, dim = features.shape
        g = self.merged_grid
        # Official merge order: token (i, j) = [(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)].
        features = features.reshape(n, g, 2, g, 2, dim).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(n, g, g, 4 * dim)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected image features of all images, concatenated in order: (total_tokens, hidden)."""
        if pixel_values.dim() != 5:
            raise ValueError(
                "pixel_values must be 5-D (num_images, num_crops + 1, 3, H, W), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if image_sizes.shape != (pixel_values.shape[0], 2):
            raise ValueError(
                f"image_sizes must be ({pixel_values.shape[0]}, 2) for {pixel_values.shape[0]} images, "
                f"got {tuple(image_sizes.shape)}"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no images, but input_ids have image positions")
        image_sizes = image_sizes.to(torch.long)
        counts = real_crop_counts(image_sizes, self.crop_size)
        max_crops = pixel_values.shape[1]
        if int(counts.max()) > max_crops:
            raise ValueError(
                f"image_sizes {image_sizes.tolist()} need up to {int(counts.max())} crops per image, "
                f"but pixel_values has {max_crops}"
            )
        # Deliberate: only real crops reach CLIP. Selecting with a mask keeps image-major order.
        keep = torch.arange(max_crops, device=counts.device)[None, :] < counts[:, None]
        # A frozen tower (--freeze_vision_model) runs without autograd: no activations kept.
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(needs_grad):
            return self._assemble(self.encode_crops(pixel_values[keep.to(pixel_values.device)]), image_sizes, counts)

    def dummy_features(self, device: torch.device) -> torch.Tensor:
        """The image side run on one all-zero 336x336 image (global + one local crop): every
        parameter that a real image uses takes part, for `Phi3VModel._dummy_image_needed`.
        (`device` is given: under ZeRO-3 reading a parameter outside a forward gathers it.)"""
        size = self.crop_size
        return self(torch.zeros(1, 2, 3, size, size, device=device), torch.tensor([[size, size]], device=device))

    def _assemble(self, merged: torch.Tensor, image_sizes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = self.glb_GN.dtype  # projector dtype (its weights may be 4-bit packed)
        merged = merged.to(dtype)

        sub_gn, glb_gn = self.sub_GN.to(dtype), self.glb_GN.to(dtype)
        g, dim = self.merged_grid, merged.shape[-1]
        sequences, offset = [], 0
        for (height, width), count in zip(image_sizes.tolist(), counts.tolist()):
            rows, cols = height // self.crop_size, width // self.crop_size
            glb = merged[offset]
            sub = merged[offset + 1 : offset + count]
            offset += count
            sub = sub.reshape(rows, cols, g, g, dim).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, dim)
            sub = torch.cat([sub, sub_gn.expand(rows * g, 1, 1, dim).reshape(rows * g, 1, dim)], dim=1)
            glb = torch.cat([glb, sub_gn.expand(g, 1, 1, dim).reshape(g, 1, dim)], dim=1)
            sequences += [sub.reshape(-1, dim), glb_gn.reshape(1, dim), glb.reshape(-1, dim)]
        return self.img_projection(torch.cat(sequences))


class Phi3VPreTrainedModel(PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": Phi3DecoderLayer, "attentions": Phi3Attention}

    def __init__(self, config: Phi3VConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # The CLIP blocks are plain modules reading vision_config's backend; unless a backend
        # was chosen for them explicitly, they use the language model's.
        vision_config = getattr(config, "vision_config", None)
        if vision_config is not None and vision_config._attn_implementation is None:
            vision_config._attn_implementation_internal = config._attn_implementation

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Phi3VRotaryEmbedding):
            short, long, _ = module.compute_inv_freqs(module.config, module.short_inv_freq.device)
            init.copy_(module.short_inv_freq, short)
            init.copy_(module.long_inv_freq, long)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=std)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, Phi3VImageEmbedding):
            # The release initialised the separators to zero; a random draw keeps them
            # distinguishable in the tiny random model.
            init.normal_(module.glb_GN, mean=0.0, std=std)
            init.normal_(module.sub_GN, mean=0.0, std=std)


    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters (and their requires_grad); keep the never-run CLIP
        # layers frozen so optimizers and DDP do not wait for their gradients.
        for module in model.modules():
            if isinstance(module, Phi3VImageEmbedding):
                for unused in module.unused_modules():
                    unused.requires_grad_(False)
        return model


class Phi3VModel(Phi3VPreTrainedModel):
    """Phi-3-mini decoder whose token embeddings carry image features at negative ids."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.vision_embed_tokens = Phi3VImageEmbedding(config) if config.has_vision else None
        self.layers = nn.ModuleList(
            [Phi3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3VRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Set for generation under DeepSpeed ZeRO-3: see `_dummy_image_needed`.
        self.vision_lockstep = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected features of every image, in order: (sum of num_img_tokens, hidden_size)."""
        if self.vision_embed_tokens is None:
            raise ValueError("this Phi3VConfig has no vision tower (embd_layer is 'default')")
        return self.vision_embed_tokens(pixel_values, image_sizes)

    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the image positions (ids < 0).

        Official: the k in <|image_k|> (id -k) is ignored; images fill the negative positions in
        row-major order of the batch. Without negative ids, the vision tower does not run --
        except in a distributed job, where it may run on a dummy image (see `_dummy_image_needed`).
        """
        return self.embed_with_features(input_ids, pixel_values, image_sizes)[0]

    def embed_with_features(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_hidden_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`embed`, also returning the image features it used (None without images). Given
        `image_hidden_states` (the features of these images from an earlier forward), the vision
        tower does not run and pixel_values are not needed."""
        image_mask = input_ids < 0
        # Out of place, so the caller's input_ids keep their negative ids (official for 3.5).
        embeds = self.embed_tokens(input_ids.masked_fill(image_mask, 0))
        num_positions = int(image_mask.sum())
        if self.vision_embed_tokens is not None and self._dummy_image_needed(num_positions > 0, embeds.device):
            # Every element times zero (not the sum times zero, which could overflow to inf in
            # fp16 and give NaN): the loss and every gradient are exactly those without it.
            features = self.vision_embed_tokens.dummy_features(embeds.device)
            embeds = embeds + (features * 0).sum().to(embeds.dtype)
        features = None
        if num_positions:
            if image_hidden_states is not None:
                features, source = image_hidden_states, "the given image_hidden_states hold"
            elif pixel_values is None or image_sizes is None:
                raise ValueError(
                    f"input_ids hold {num_positions} image positions (negative ids) but pixel_values "
                    "and image_sizes were not given"
                )
            else:
                features = self.get_image_features(pixel_values, image_sizes)
                source = f"the {pixel_values.shape[0]} images give"
            if features.shape[0] != num_positions:
                raise ValueError(
                    f"input_ids hold {num_positions} image positions but {source} {features.shape[0]} "
                    "features: each <|image_k|> tag must be expanded by the processor of the same "
                    "num_crops, once per image"
                )
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        return self.embed_dropout(embeds), features

    def _dummy_image_needed(self, has_images: bool, device: torch.device) -> bool:
        """Whether this forward must run the image side on a dummy image because it has no image.

        In a distributed job every rank must make the same collective calls. A rank whose batch
        has no image would skip the vision tower while the others run it: DDP and DeepSpeed
        ZeRO-2 would then reduce different gradient sets (a collective mismatch: a crash with
        gloo, a hang with NCCL), and ZeRO-3 would all-gather different parameters (a deadlock).
        - In training (grad enabled, more than one rank), an image-less forward always runs the
          image side on a dummy image whose result is multiplied by zero: every trainable
          parameter is used in every step on every rank, with zero gradient from the dummy.
        - With `vision_lockstep` set (the recipe sets it for generation under ZeRO-3, where
          ranks generate in lockstep and parameters are gathered per forward), the ranks agree
          in each forward: if any rank has an image, the others run the dummy. This costs one
          scalar all-reduce per forward and no vision work in decoding steps without images.
        No parameter is touched here: under ZeRO-3 reading one outside a forward gathers it,
        a collective call of its own on this rank only.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        if self.vision_lockstep:
            flag = torch.tensor([int(has_images)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item()) and not has_images
        return not has_images and self.training and torch.is_grad_enabled()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_hidden_states: torch.Tensor | None = None,
        sequence_lengths: torch.LongTensor | None = None,
        **kwargs,
    ) -> Phi3VModelOutputWithPast:
        r"""
        image_hidden_states: projected features of the batch's images, as an earlier forward over the
            same images returned them; the vision tower then does not run.
        sequence_lengths: for rows that hold several sequences (with a 4-D attention mask keeping
            them apart), the length of each token's sequence, shaped like `position_ids`: each token
            gets the LongRoPE factors of its sequence run alone. Padding-free rows (no mask,
            restarting position ids) get them from `position_ids` without it.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        features = None
        if inputs_embeds is None:
            inputs_embeds, features = self.embed_with_features(input_ids, pixel_values, image_sizes, image_hidden_states)

        # Padding-free rows (recipe/packing.py): no attention mask, position ids restarting at each
        # example. Such a batch is never continued, so it gets no cache (transformers' mask builders
        # read the packing from position_ids only without one).
        packed = None
        if attention_mask is None and position_ids is not None and position_ids.shape[0] == inputs_embeds.shape[0]:
            if past_key_values is None or past_key_values.get_seq_length() == 0:
                packed = packed_sequence_lengths(position_ids)
        if packed is not None:
            use_cache, past_key_values = False, None
        # Each token's rotary factors as for its own sequence alone: given, or read from the packing.
        rope_lengths = sequence_lengths if sequence_lengths is not None else packed

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            # Official: plain positions, left padding ignored (generate() passes its own).
            position_ids = torch.arange(past_seen, past_seen + seq_len, device=inputs_embeds.device)[None]

        if packed is not None and "flash" in self.config._attn_implementation:
            # Varlen boundaries computed once here rather than in every layer (transformers' helper).
            (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
            kwargs.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))

        mask_fn = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        # (With attention_mask None, transformers makes the mask block-diagonal from position_ids.)
        causal_mask = mask_fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        if rope_lengths is None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids, key_length=past_seen + seq_len)
        else:
            position_embeddings = self.rotary_emb.per_sequence(hidden_states, position_ids, rope_lengths)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return Phi3VModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            image_hidden_states=features,
        )


class Phi3VForCausalLM(Phi3VPreTrainedModel, GenerationMixin):
    """Phi-3.5-vision-instruct: `forward(input_ids, attention_mask, position_ids, past_key_values,
    inputs_embeds, pixel_values, image_sizes, labels, use_cache, ...)` as the official model."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # Deliberate (docs/checkpoint_format.md §1): generation stops at <|end|> and <|endoftext|> by default, not at the
        # config's eos 2. In the released vocabulary (and the tiny one) <|end|> sits 7 ids after
        # <|endoftext|> (= pad). A generation_config.json in a checkpoint still takes precedence.
        pad = config.pad_token_id
        if pad is not None and pad + 7 < config.vocab_size and self.generation_config.eos_token_id in (
            None, config.eos_token_id, [config.eos_token_id]
        ):
            self.generation_config.eos_token_id = [pad + 7, pad]
            self.generation_config.pad_token_id = pad

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, image_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_hidden_states: torch.Tensor | None = None,
        sequence_lengths: torch.LongTensor | None = None,
        **kwargs,
    ) -> Phi3VCausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            use_cache=use_cache,
            image_hidden_states=image_hidden_states,
            sequence_lengths=sequence_lengths,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states).float()  # official: logits in float32

        loss = None
        if labels is not None:
            labels = labels.masked_fill(labels < 0, -100)  # deliberate: image positions never count
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return Phi3VCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, is_first_iteration=False, **kwargs):
        # Official Phi-3.5-vision: the first time the sequence crosses
        # original_max_position_embeddings, the cache (built with short factors) is dropped and
        # everything is recomputed with the long factors -- images included, so the pixels must
        # be passed again. Official Phi-3-vision-128k keeps the cache: keys computed before the
        # switch keep their short-factor rotation.
        limit = self.config.original_max_position_embeddings
        if (
            self.config.model_family != PHI3V_128K
            and self.config.rope_parameters.get("rope_type") == "longrope"
            and past_key_values is not None
            and input_ids.shape[1] >= limit + 1
            and past_key_values.get_seq_length() <= limit
        ):
            past_key_values = DynamicCache(config=self.config)
            kwargs["next_sequence_length"] = None
            is_first_iteration = True
        return super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, is_first_iteration=is_first_iteration, **kwargs
        )
