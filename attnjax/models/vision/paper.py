"""Parameter counts and FLOPs (multiply-adds, 224x224, 1000 classes) as
reported by each paper, with the table they are taken from.

`rounded=True`: the paper prints one significant figure only (ConViT-Ti:
"6M", "1G" -- its DeiT-Ti row, 5.7M / 1.3G elsewhere, is printed the same
way); the test then checks that our count rounds to the printed value.
"""

# name: (preset, params, flops, source, rounded)
PAPER = {
    "vit": ("s16", 22e6, 4.6e9,
            "DeiT (Touvron et al. 2021) Table 1: DeiT-S = ViT-S/16, 22M params, "
            "4.6 GFLOPs", False),
    "agent_deit": ("t", 6.0e6, 1.2e9,
                   "Agent Attention (Han et al. 2024), model table of the "
                   "official repository (LeapLabTHU/Agent-Attention): "
                   "Agent-DeiT-T 6.0M, 1.2G", False),
    "swin": ("t", 28e6, 4.5e9,
             "Swin (Liu et al. 2021) Table 1(a): Swin-T 28M, 4.5G", False),
    "nat": ("mini", 20e6, 2.7e9,
            "NAT (Hassani et al. 2023) Table 1: NAT-Mini 20M, 2.7G", False),
    "dinat": ("mini", 20e6, 2.7e9,
              "DiNAT (Hassani & Shi 2022) Table 2: DiNAT-Mini 20M, 2.7G",
              False),
    "davit": ("t", 28.3e6, 4.5e9,
              "DaViT (Ding et al. 2022) Table 1: DaViT-Tiny 28.3M, 4.5G",
              False),
    "cswin": ("t", 23e6, 4.3e9,
              "CSWin (Dong et al. 2022) Table 2: CSWin-T 23M, 4.3G", False),
    "twins_svt": ("s", 24e6, 2.9e9,
                  "Twins (Chu et al. 2021) Table 5: Twins-SVT-S 24M, 2.9G",
                  False),
    "biformer": ("t", 13.1e6, 2.2e9,
                 "BiFormer (Zhu et al. 2023) Table 1: BiFormer-T 13.1M, 2.2G",
                 False),
    "convit": ("ti", 6e6, 1e9,
               "ConViT (d'Ascoli et al. 2021) Table 1: ConViT-Ti 6M, 1G "
               "(one significant figure)", True),
    "shvit": ("s1", 6.3e6, 241e6,
              "SHViT (Yun & Ro 2024) Table 2: SHViT-S1 6.3M, 241M FLOPs",
              False),
    "maxvit": ("t", 31e6, 5.6e9,
               "MaxViT (Tu et al. 2022) Table 2: MaxViT-T 31M, 5.6G", False),
    "crossvit": ("ti", 6.9e6, 1.6e9,
                 "CrossViT (Chen et al. 2021) Table 2: CrossViT-Ti 6.9M, "
                 "1.6G (240x240 input, large branch at 224)", False),
    "litv2": ("s", 28e6, 3.7e9,
              "LITv2 (Pan et al. 2022) Table 1: LITv2-S 28M, 3.7G", False),
}

# Input size of the reported FLOPs (224 unless the paper says otherwise).
RESOLUTION = {"crossvit": 240}

PAPER_PRESET = {k: v[0] for k, v in PAPER.items()}
PAPER_STATS = {k: {"params": v[1], "flops": v[2], "source": v[3],
                   "rounded": v[4], "resolution": RESOLUTION.get(k, 224)}
               for k, v in PAPER.items()}
