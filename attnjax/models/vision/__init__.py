"""Vision backbones composed from attnjax.nn / attnjax.spatial / attnjax.sequence.

>>> from attnjax.models import vision
>>> model = vision.create_model("swin", "tiny")          # 32x32, 10 classes
>>> logits = model(images)                               # [B, H, W, C] input
>>> feats = model.features(images)                       # multi-scale maps
>>> vision.count_params(vision.model_ctor("swin", "t"))  # no allocation
>>> vision.count_flops(vision.model_ctor("swin", "t"))   # MACs at 224x224
>>> vision.attention_maps(model, images)                 # {block: [B,N,T,S]}
>>> vision.load_timm(model, "swin_t.safetensors")        # pretrained weights

See docs/vision.md.
"""

from attnjax.models.vision import presets as _presets  # registers models
from attnjax.models.vision.attention_maps import attention_maps, layer_map
from attnjax.models.vision.complexity import count_flops, count_params
from attnjax.models.vision.convert import (CheckpointMismatchError,
                                           load_state_dict, load_timm)
from attnjax.models.vision.registry import (create_model, model_ctor,
                                            model_kwargs, model_names, presets)
from attnjax.models.vision.paper import PAPER_PRESET, PAPER_STATS

__all__ = [
    "CheckpointMismatchError", "PAPER_PRESET", "PAPER_STATS",
    "attention_maps", "count_flops", "count_params", "create_model",
    "layer_map", "load_state_dict", "load_timm", "model_ctor", "model_kwargs",
    "model_names", "presets",
]
