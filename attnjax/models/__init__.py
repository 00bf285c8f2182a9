"""Models built from attnjax primitives.

* `attnjax.models.icl`: the one-layer multi-head attention model of the
  in-context linear regression study (He et al. 2025).
* `attnjax.models.random_feature_attention`: random-feature attention
  (frozen random query-key matrices, trainable values; Fu et al. 2023).
* `attnjax.models.rank_models`: the low-rank/full-rank attention networks of
  the benefits-of-rank study (Amsel et al. 2024).
* `attnjax.models.vision`: vision backbones (ViT, Swin, MaxViT, NAT, ...).

Submodules are imported on use (`from attnjax.models import icl`), so
importing attnjax stays light.
"""
