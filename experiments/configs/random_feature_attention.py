"""Configs for `experiments.random_feature_attention`.

Run:
  python -m experiments.random_feature_attention --workdir=/tmp/rfa \
      --config=experiments/configs/random_feature_attention.py:default

Presets:
  default  d=8, N=8 keys, M=128 heads, n up to 4096, 2 draws; finishes on a
           2-core CPU in a few minutes and shows the paper's two findings.
  paper    the paper's scale as far as we could establish it (larger d, N,
           M; n up to 2^14; 5 draws). Needs a big machine / a lot of time.
  tiny     for tests and the colab (seconds).
"""

import ml_collections

PRESETS = ("default", "paper", "tiny")
# Allowed names (experiments.common.validate_config checks them).
CHOICES = {
    "targets": ("key_linear", "he1", "he2", "he3", "he4", "bilinear_sq"),
    "models": ("rfa_zero", "rfa_identity", "rf_mlp"),
    "nonlinearity": ("relu", "softmax"),
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  preset = preset or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}: choose one of "
                     f"{', '.join(PRESETS)}.")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  # Inputs: x_0, x_1..x_N i.i.d. uniform on the unit sphere S^{d-1}; every
  # token gets a constant 1 appended (x~ = [x; 1]) so heads and the MLP have
  # a bias, as in the paper.
  c.dim = 8                       # d
  c.num_keys = 8                  # N
  c.num_heads = 128               # M (RFA trainable params: M * (d + 1))
  c.qk_std = 1.0                  # entry std of W_m around its mean
  # Identity-centred sampling: W_m = identity_mean_scale * I_d (on the token
  # coordinates; 0 on the appended constant) + qk_std * G_m.
  c.identity_mean_scale = 3.0
  c.nonlinearity = "relu"         # 'relu' (paper) or 'softmax'
  c.models = ("rfa_zero", "rfa_identity", "rf_mlp")
  # Targets (1/N) sum_i F(x_0, x_i) of increasing complexity; t_i =
  # sqrt(d) <x_0, x_i> is approx N(0, 1) and He_k are Hermite polynomials.
  #   key_linear: F = sqrt(d) <beta, x_i>       (ignores the query)
  #   he1:        F = He_1(t_i) = t_i           (bilinear)
  #   he2:        F = He_2(t_i) = t_i^2 - 1
  #   he3:        F = He_3(t_i) = t_i^3 - 3 t_i
  #   he4:        F = He_4(t_i)
  #   bilinear_sq: F = (sqrt(d) x_0^T A x_i)^2 - E[.] with a random A
  #               (quadratic but not a function of <x_0, x_i>)
  c.targets = ("key_linear", "he1", "he2", "he3")
  c.label_noise = 0.0             # std of Gaussian noise on training labels
  c.sample_sizes = (128, 256, 512, 1024, 2048, 4096)
  c.num_val = 1000                # ridge penalty chosen on this split
  c.num_test = 2000
  c.ridge_lambdas = tuple(10.0 ** e for e in range(-8, 1))
  c.num_repeats = 2               # independent draws of data and features
  c.feature_batch = 1024          # examples per feature-computation batch
  c.error_threshold = 0.5         # for "samples to reach" in the headline

  if preset == "default":
    pass
  elif preset == "paper":
    c.dim = 16
    c.num_keys = 16
    c.num_heads = 512
    c.identity_mean_scale = 4.0
    c.targets = ("key_linear", "he1", "he2", "he3", "he4", "bilinear_sq")
    c.sample_sizes = (256, 512, 1024, 2048, 4096, 8192, 16384)
    c.num_val = 2000
    c.num_test = 4000
    c.num_repeats = 5
  elif preset == "tiny":
    c.dim = 4
    c.num_keys = 4
    c.num_heads = 16
    c.identity_mean_scale = 2.0
    c.targets = ("he1", "he2")
    c.sample_sizes = (32, 64, 128)
    c.num_val = 64
    c.num_test = 128
    c.ridge_lambdas = (1e-6, 1e-4, 1e-2, 1.0)
    c.num_repeats = 2
    c.feature_batch = 64
  else:
    raise ValueError(f"unknown preset {preset!r}; use default, paper or tiny.")
  return c
