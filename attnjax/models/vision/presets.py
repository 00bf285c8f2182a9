"""Size presets and the papers' reported sizes for every vision model."""

from attnjax.models.vision import nat, swin, vit
from attnjax.models.vision.registry import register

TINY = dict(img_size=32, num_classes=10)

# name: (smallest official preset, its kwargs)
register("vit", vit.ViT, {
    "s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
                num_heads=6),                                    # ViT-S/16 = DeiT-S
    "tiny": dict(TINY, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0),
})
register("agent_vit", vit.ViT, {
    "s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
                num_heads=6, mixer="agent", num_agents=49),
    "tiny": dict(TINY, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0, mixer="agent", num_agents=16),
})
# Agent-DeiT (official layer: agent biases + dwc; 49 agents in every block).
register("agent_deit", vit.ViT, {
    "t": dict(img_size=224, patch_size=16, embed_dim=192, depth=12,
              num_heads=3, mixer="agent_deit", num_agents=49),
    "s": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
              num_heads=6, mixer="agent_deit", num_agents=49),
    "tiny": dict(TINY, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0, mixer="agent_deit", num_agents=16),
})
register("moh_vit", vit.ViT, {
    "s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12,
                num_heads=6, mixer="moh", moh_shared_heads=2,
                moh_active_heads=4),
    "tiny": dict(TINY, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0, mixer="moh", moh_shared_heads=1,
                 moh_active_heads=3),
})
register("swin", swin.Swin, {
    "t": dict(img_size=224, embed_dim=96, depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), window_size=7),
    "tiny": dict(TINY, patch_size=2, embed_dim=32, depths=(2, 2),
                 num_heads=(2, 4), window_size=4, mlp_ratio=2.0),
})
register("nat", nat.NAT, {
    "mini": dict(img_size=224, embed_dim=64, depths=(3, 4, 6, 5),
                 num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0),
    "tiny": dict(TINY, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                 kernel_size=3, mlp_ratio=2.0),
})
register("dinat", nat.NAT, {
    "mini": dict(img_size=224, embed_dim=64, depths=(3, 4, 6, 5),
                 num_heads=(2, 4, 8, 16), kernel_size=7, mlp_ratio=3.0,
                 dilations=((1, 8, 1), (1, 4, 1, 4), (1, 2, 1, 2, 1, 2),
                            (1, 1, 1, 1, 1))),
    "tiny": dict(TINY, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                 kernel_size=3, mlp_ratio=2.0, dilations=((1, 2), (1, 1))),
})

from attnjax.models.vision import convit, hierarchical, shvit  # noqa: E402

register("davit", hierarchical.Hierarchical, {
    "t": dict(family="davit", dims=(96, 192, 384, 768), depths=(1, 1, 3, 1),
              num_heads=(3, 6, 12, 24), window_size=7),
    "tiny": dict(TINY, family="davit", dims=(32, 64), depths=(1, 1),
                 num_heads=(2, 4), window_size=4, stem_div=2, mlp_ratio=2.0),
})
register("cswin", hierarchical.Hierarchical, {
    "t": dict(family="cswin", dims=(64, 128, 256, 512), depths=(1, 2, 21, 1),
              num_heads=(2, 4, 8, 16), stripes=(1, 2, 7, 7)),
    "tiny": dict(TINY, family="cswin", dims=(32, 64), depths=(1, 2),
                 num_heads=(2, 4), stripes=(2, 4), stem_div=2, mlp_ratio=2.0),
})
register("twins_svt", hierarchical.Hierarchical, {
    "s": dict(family="twins", dims=(64, 128, 256, 512), depths=(2, 2, 10, 4),
              num_heads=(2, 4, 8, 16), window_size=7, sr_ratios=(8, 4, 2, 1)),
    "tiny": dict(TINY, family="twins", dims=(32, 64), depths=(2, 2),
                 num_heads=(2, 4), window_size=4, sr_ratios=(4, 2),
                 stem_div=2, mlp_ratio=2.0),
})
register("biformer", hierarchical.Hierarchical, {
    "t": dict(family="biformer", dims=(64, 128, 256, 512), depths=(2, 2, 8, 2),
              num_heads=(2, 4, 8, 16), mlp_ratio=3.0, num_regions=7,
              topks=(1, 4, 16, -1)),
    "tiny": dict(TINY, family="biformer", dims=(32, 64), depths=(2, 2),
                 num_heads=(2, 4), mlp_ratio=2.0, num_regions=4, topks=(2, -1),
                 stem_div=2),
})
register("convit", convit.ConViT, {
    "ti": dict(img_size=224, patch_size=16, embed_dim=192, depth=12,
               num_heads=4, local_layers=10),
    "tiny": dict(TINY, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                 local_layers=3, mlp_ratio=2.0),
})
register("shvit", shvit.SHViT, {
    "s1": dict(dims=(128, 224, 320), depths=(2, 4, 5), pdims=(32, 48, 68),
               types=("i", "s", "s")),
    "tiny": dict(TINY, dims=(32, 48, 64), depths=(1, 1, 1), pdims=(8, 12, 16),
                 types=("i", "s", "s"), stem_strides=(2, 1, 1, 1)),
})

from attnjax.models.vision import crossvit, litv2, maxvit  # noqa: E402

register("maxvit", maxvit.MaxViT, {
    "t": dict(stem_dim=64, dims=(64, 128, 256, 512), depths=(2, 2, 5, 2),
              head_dim=32, window_size=7, grid_size=7),
    "tiny": dict(TINY, stem_dim=16, dims=(32, 64), depths=(1, 1), head_dim=16,
                 window_size=4, grid_size=4, mlp_ratio=2.0, stem_stride=1),
})
register("crossvit", crossvit.CrossViT, {
    "ti": dict(img_size=240, patch_sizes=(12, 16), dims=(96, 192),
               depths=(1, 4), num_multiscale=3, num_heads=(3, 3)),
    "tiny": dict(TINY, patch_sizes=(4, 8), dims=(32, 64), depths=(1, 1),
                 num_multiscale=2, num_heads=(2, 2), mlp_ratio=2.0,
                 branch_scale=1.0),
})
register("litv2", litv2.LITv2, {
    "s": dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), alpha=0.9, windows=(0, 0, 2, 1)),
    "tiny": dict(TINY, patch_size=2, dims=(32, 64), depths=(1, 2),
                 num_heads=(2, 4), alpha=0.5, windows=(0, 2), mlp_ratio=2.0),
})
