"""Full-size check of the timm converters (needs torch + timm; run by hand).

  python -m attnjax.models.vision.check_timm [--models=vit,swin] [--batch=2]

For each model timm has, builds timm's network at its published size with
random weights (`pretrained=False`: nothing downloads), writes its state
dict to a temporary .safetensors file, loads it into the attnjax paper
preset with `load_timm`, and prints a markdown table: max |logit diff| on
random 224x224 images (240 for CrossViT), the largest |logit|, and whether
the parameter counts are equal. The table in docs/vision.md is its output.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

# attnjax name: (timm architecture, attnjax preset, image size)
MODELS = {
    "vit": ("vit_small_patch16_224", "s16", 224),
    "swin": ("swin_tiny_patch4_window7_224", "t", 224),
    "davit": ("davit_tiny", "t", 224),
    "twins_svt": ("twins_svt_small", "s", 224),
    "convit": ("convit_tiny", "ti", 224),
    "shvit": ("shvit_s1", "s1", 224),
    "crossvit": ("crossvit_tiny_240", "ti", 240),
    "maxvit": ("maxvit_tiny_tf_224", "t", 224),
}


def perturbed_timm_model(arch, *, seed=0, scale=0.02, **kwargs):
  """A randomly initialised timm model in eval mode whose parameters get
  `scale` x N(0, 1) added and whose BatchNorm statistics are random, so no
  zero/one-initialised tensor can hide a conversion bug."""
  import torch
  import timm
  torch.manual_seed(seed)
  tm = timm.create_model(arch, pretrained=False, **kwargs).eval()
  with torch.no_grad():
    for p in tm.parameters():
      p.add_(scale * torch.randn_like(p))
    for n, b in tm.named_buffers():
      if n.endswith("running_mean"):
        b.normal_(0, 0.1)
      elif n.endswith("running_var"):
        b.uniform_(0.5, 1.5)
  return tm


def check(name, batch=2, seed=0):
  import torch
  from safetensors.numpy import save_file
  from attnjax.models import vision
  arch, preset, size = MODELS[name]
  tm = perturbed_timm_model(arch, seed=seed, scale=0.02)
  sd = {k: v.detach().contiguous().numpy() for k, v in tm.state_dict().items()}
  timm_params = sum(p.numel() for p in tm.parameters())
  model = vision.create_model(name, preset, num_classes=1000)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, f"{name}.safetensors")
    save_file(sd, path)
    vision.load_timm(model, path)
  model.eval()
  x = np.random.default_rng(seed).standard_normal(
      (batch, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  out = np.asarray(model(x))
  ours = vision.count_params(model)
  return dict(model=name, timm=arch, size=size,
              max_abs_diff=float(np.abs(out - ref).max()),
              max_abs_logit=float(np.abs(ref).max()),
              params=ours, timm_params=int(timm_params),
              params_equal=ours == timm_params)


def main(argv):
  names = list(MODELS)
  batch = 2
  for a in argv[1:]:
    if a.startswith("--models="):
      names = a.split("=", 1)[1].split(",")
    elif a.startswith("--batch="):
      batch = int(a.split("=", 1)[1])
  print("| model | timm architecture | input | max abs logit diff | "
        "max abs logit | params (attnjax) | params equal |")
  print("|---|---|---|---:|---:|---:|---|")
  for n in names:
    t0 = time.time()
    r = check(n, batch)
    print(f"| {r['model']} | {r['timm']} | {r['size']} | "
          f"{r['max_abs_diff']:.1e} | {r['max_abs_logit']:.2f} | "
          f"{r['params']:,} | {'yes' if r['params_equal'] else 'NO'} |",
          flush=True)
    print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main(sys.argv)
