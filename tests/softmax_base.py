"""The shared test suite every softmax-attention implementation runs.

Subclass `SoftmaxAttentionSuite` in a `test_*.py` file, name the class
`Test...`, and either set `implementation` (a name for
`attnjax.dot_product_attention(implementation=...)`) or override `attention`.
Capability flags switch off what a backend legitimately refuses (it must then
raise NotImplementedError, which `test_refusals_are_not_implemented` checks).

Every check compares with `tests.reference_np.attention_np`: float64 NumPy
written from the definition, with hand-derived gradients.

Strict JAX modes: every test runs under the mode named by the
`ATTNJAX_STRICT_MODE` environment variable (tests/strict_modes.py:
rank_promotion, dtype_promotion, debug_infs), or under the class attribute
`strict_mode` when a subclass sets it. Checks that legitimately produce an
inf (an lse of -inf on an empty row, a user-given -inf bias) are skipped
under debug_infs.
"""

from __future__ import annotations

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from tests.reference_np import attention_np
from tests.strict_modes import env_strict_mode
from tests.strict_modes import ALL as _ALL
from tests.strict_modes import includes as _includes
from tests.strict_modes import strict_mode as _strict_ctx

DTYPES = [jnp.float32, jnp.bfloat16]


def _tol(dtype):
  # (atol, rtol) for values; gradient checks use relative Frobenius error.
  return (2e-5, 2e-5) if dtype == jnp.float32 else (3e-2, 3e-2)


def _grad_tol(dtype):
  return 2e-4 if dtype == jnp.float32 else 6e-2


def _rand(seed, shape, dtype, scale=1.0):
  x = np.random.default_rng(seed).standard_normal(shape) * scale
  return jnp.asarray(x, dtype)


def _walk_eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (loops, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for val in eqn.params.values():
      for sub in (val if isinstance(val, (tuple, list)) else (val,)):
        if hasattr(sub, "eqns"):
          yield from _walk_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _walk_eqns(sub.jaxpr)


def _rel_err(a, b):
  """Relative Frobenius error, floored at |b| = 1.

  The floor matters where the exact gradient is identically zero (a query
  that sees a single key has dq = 0): float32 rounding of dP - rowsum(dO * O)
  leaves ~1e-7 residues that a pure relative error would report as huge.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


class SoftmaxAttentionSuite:
  implementation = None
  supports_bias = True
  supports_dropout = False
  supports_lse = True
  supports_segment_ids = True
  supports_value_head_dim = True
  bf16_only = False   # e.g. cuDNN
  # Options beyond jax.nn's (a backend that lacks one must refuse it):
  supports_soft_cap = True     # logits_soft_cap
  supports_sinks = True        # sinks
  supports_positions = True    # causal_alignment='bottom_right', q/kv_offset
  supports_precision = True    # precision=
  strict_mode = None  # one of tests.strict_modes.STRICT_MODES, else $env

  @pytest.fixture(autouse=True)
  def _strict_mode_fixture(self):
    with _strict_ctx(self._mode()):
      self._lifted = []
      yield
      for ctx in reversed(self._lifted):
        ctx.__exit__(None, None, None)

  def _skip_or_lift_debug_infs(self, reason):
    """For a check whose inf is legitimate: skips under 'debug_infs'; under
    'all' (CI) turns debug_infs off for the rest of the test, so the two
    promotion modes still apply to it."""
    mode = self._mode()
    if mode == "debug_infs":
      pytest.skip(reason)
    if mode == _ALL:
      ctx = jax.debug_infs(False)
      ctx.__enter__()
      self._lifted.append(ctx)

  def _mode(self):
    return self.strict_mode or env_strict_mode()

  # Shapes small enough for interpret-mode kernels.
  B, T, S, N, K, H = 2, 19, 23, 4, 2, 16

  def attention(self, q, k, v, bias=None, mask=None, **kw):
    return attnjax.dot_product_attention(
        q, k, v, bias, mask, implementation=self.implementation, **kw)

  def attention_with_lse(self, q, k, v, bias=None, mask=None, **kw):
    return attnjax.dot_product_attention_with_lse(
        q, k, v, bias, mask, implementation=self.implementation, **kw)

  # ------------------------------------------------------------- helpers
  def _dtypes(self):
    return [jnp.bfloat16] if self.bf16_only else DTYPES

  def _inputs(self, dtype, *, b=None, t=None, s=None, n=None, kh=None, h=None,
              hv=None, seed=0, scale=1.0):
    b = b or self.B
    t = t or self.T
    s = s or self.S
    n = n or self.N
    kh = kh or self.K
    h = h or self.H
    hv = hv or h
    q = _rand(seed, (b, t, n, h), dtype, scale)
    k = _rand(seed + 1, (b, s, kh, h), dtype, scale)
    v = _rand(seed + 2, (b, s, kh, hv), dtype)
    return q, k, v

  def _check_values(self, dtype, q, k, v, bias=None, mask=None, ref_kw=None,
                    **kw):
    out = self.attention(q, k, v, bias, mask, **kw)
    assert out.dtype == q.dtype
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    ref = attention_np(q, k, v, bias, mask=mask, **(ref_kw or {}))
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref["out"],
                               atol=atol, rtol=rtol)
    return out, ref

  def _check_grads(self, dtype, q, k, v, bias=None, mask=None, ref_kw=None,
                   **kw):
    dout = _rand(99, q.shape[:-1] + (v.shape[-1],), jnp.float32)

    def loss(q, k, v, bias):
      out = self.attention(q, k, v, bias, mask, **kw)
      return jnp.sum(out.astype(jnp.float32) * dout)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = jax.grad(loss, argnums=argnums)(q, k, v, bias)
    ref = attention_np(q, k, v, bias, mask=mask, dout=dout, **(ref_kw or {}))
    names = ["dq", "dk", "dv", "dbias"][:len(argnums)]
    for name, g in zip(names, grads):
      primal = {"dq": q, "dk": k, "dv": v, "dbias": bias}[name]
      assert g.dtype == primal.dtype, (name, g.dtype, primal.dtype)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), name
      err = _rel_err(g, ref[name])
      assert err < _grad_tol(dtype), f"{name}: relative error {err}"

  # --------------------------------------------------------------- tests
  @pytest.mark.parametrize("is_causal", [False, True])
  @pytest.mark.parametrize("dtype", DTYPES)
  def test_values(self, dtype, is_causal):
    if dtype not in self._dtypes():
      pytest.skip("dtype not served by this backend")
    q, k, v = self._inputs(dtype)
    self._check_values(dtype, q, k, v, is_causal=is_causal,
                       ref_kw=dict(is_causal=is_causal))

  @pytest.mark.parametrize("is_causal", [False, True])
  @pytest.mark.parametrize("dtype", DTYPES)
  def test_grads(self, dtype, is_causal):
    if dtype not in self._dtypes():
      pytest.skip("dtype not served by this backend")
    q, k, v = self._inputs(dtype)
    self._check_grads(dtype, q, k, v, is_causal=is_causal,
                      ref_kw=dict(is_causal=is_causal))

  @pytest.mark.parametrize("n,kh", [(4, 4), (4, 2), (4, 1), (6, 3)])
  def test_gqa_mqa(self, n, kh):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, n=n, kh=kh, seed=3)
    self._check_values(dtype, q, k, v)
    self._check_grads(dtype, q, k, v)

  @pytest.mark.parametrize("t,s", [(7, 29), (29, 7), (1, 16), (16, 1)])
  def test_causal_q_len_ne_kv_len(self, t, s):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, t=t, s=s, seed=4)
    self._check_values(dtype, q, k, v, is_causal=True,
                       ref_kw=dict(is_causal=True))
    self._check_grads(dtype, q, k, v, is_causal=True,
                      ref_kw=dict(is_causal=True))

  @pytest.mark.parametrize("kind", ["dense", "window_int", "window_pair",
                                    "window_causal", "lengths", "segments",
                                    "block", "combined"])
  def test_masks(self, kind):
    dtype = self._dtypes()[0]
    b, t, s = self.B, self.T, self.S
    q, k, v = self._inputs(dtype, seed=5)
    rng = np.random.default_rng(7)
    kw, ref_kw, mask = {}, {}, None
    if kind == "dense":
      mask = jnp.asarray(rng.random((b, 1, t, s)) < 0.6)
    elif kind == "window_int":
      kw, ref_kw = dict(local_window_size=3), dict(window=3)
    elif kind == "window_pair":
      kw, ref_kw = dict(local_window_size=(4, 1)), dict(window=(4, 1))
    elif kind == "window_causal":
      kw = dict(local_window_size=(5, 5), is_causal=True)
      ref_kw = dict(window=(5, 5), is_causal=True)
    elif kind == "lengths":
      ql, kl = np.array([t, 5]), np.array([9, s])
      kw = dict(query_seq_lengths=jnp.asarray(ql),
                key_value_seq_lengths=jnp.asarray(kl))
      ref_kw = dict(q_lengths=ql, kv_lengths=kl)
    elif kind == "segments":
      if not self.supports_segment_ids:
        pytest.skip("segment ids not supported")
      qs = np.sort(rng.integers(0, 3, (b, t)), axis=1)
      ks = np.sort(rng.integers(0, 3, (b, s)), axis=1)
      kw = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
      ref_kw = dict(q_segment_ids=qs, kv_segment_ids=ks)
    elif kind == "block":
      layout = rng.random((-(-t // 8), -(-s // 8))) < 0.5
      layout[:, 0] = True
      mask = M.block_mask(layout, 8, 8, t, s)
    elif kind == "combined":
      dense = jnp.asarray(rng.random((1, self.N, t, s)) < 0.8)
      mask = M.and_masks(dense, M.local_window_mask(t, s, (6, 2)))
      kw = dict(is_causal=True)
      ref_kw = dict(is_causal=True)
      if self.supports_segment_ids:
        qs = np.sort(rng.integers(0, 2, (b, t)), axis=1)
        ks = np.sort(rng.integers(0, 2, (b, s)), axis=1)
        kw.update(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
        ref_kw.update(q_segment_ids=qs, kv_segment_ids=ks)
    self._check_values(dtype, q, k, v, mask=mask, ref_kw=ref_kw, **kw)
    self._check_grads(dtype, q, k, v, mask=mask, ref_kw=ref_kw, **kw)

  @pytest.mark.parametrize("bias_shape", ["full", "heads", "rows"])
  def test_bias(self, bias_shape):
    if not self.supports_bias:
      pytest.skip("bias not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=6)
    shape = {"full": (self.B, self.N, self.T, self.S),
             "heads": (1, self.N, 1, self.S),
             "rows": (self.T, self.S)}[bias_shape]
    bias = _rand(8, shape, jnp.float32)
    self._check_values(dtype, q, k, v, bias=bias)
    self._check_grads(dtype, q, k, v, bias=bias)

  def test_fully_masked_rows_give_zeros(self):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=9)
    mask = np.ones((self.B, 1, self.T, self.S), bool)
    mask[0, :, 3, :] = False
    mask[1, :, :5, :] = False
    mask = jnp.asarray(mask)
    out, _ = self._check_values(dtype, q, k, v, mask=mask)
    assert np.all(np.asarray(out[0, 3], np.float32) == 0.0)
    assert np.all(np.asarray(out[1, :5], np.float32) == 0.0)
    self._check_grads(dtype, q, k, v, mask=mask)
    # kv lengths of zero mask whole batch rows.
    out = self.attention(q, k, v,
                         key_value_seq_lengths=jnp.asarray([0, self.S]))
    assert np.all(np.asarray(out[0], np.float32) == 0.0)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))

  def test_large_logits_stay_finite(self):
    dtype = self._dtypes()[0]
    # Logits of magnitude ~1e4 (scale 1 on inputs of norm ~100).
    q, k, v = self._inputs(dtype, seed=10, scale=25.0)
    out, ref = self._check_values(dtype, q, k, v, scale=1.0,
                                  ref_kw=dict(scale=1.0))
    assert np.abs(np.asarray(ref["lse"])).max() > 1e3
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    g = jax.grad(lambda q: jnp.sum(self.attention(q, k, v, scale=1.0)
                                   .astype(jnp.float32)))(q)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))

  def test_lse(self):
    if not self.supports_lse:
      pytest.skip("lse not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=11)
    # An empty row's lse is -inf by definition: under debug_infs the check
    # runs without one; under 'all' both ways (first every row non-empty
    # with the three modes on, then the empty row with debug_infs lifted).
    mode = self._mode()
    if mode == _ALL:
      variants = (False, True)
    else:
      variants = (not _includes(mode, "debug_infs"),)
    for empty_row in variants:
      if empty_row and mode == _ALL:
        self._skip_or_lift_debug_infs("an empty row's lse is -inf")
      mask = np.ones((1, 1, self.T, self.S), bool)
      if empty_row:
        mask[..., 2, :] = False
      out, lse = self.attention_with_lse(q, k, v, mask=jnp.asarray(mask),
                                         is_causal=True)
      ref = attention_np(q, k, v, mask=mask, is_causal=True)
      assert lse.shape == (self.B, self.N, self.T)
      finite = np.isfinite(ref["lse"])
      assert np.all(finite) != empty_row
      assert np.all(np.isneginf(np.asarray(lse))[~finite])
      np.testing.assert_allclose(np.asarray(lse)[finite], ref["lse"][finite],
                                 atol=5e-4 if dtype == jnp.float32 else 5e-2)

  # ------------------------------------------------ masked-slot invariance
  def _dead_slot_case(self, kind, rng):
    """(kwargs, ref_kw, mask, dead [B, S] bool): key slots no query can
    attend under `kind`."""
    b, t, s = self.B, self.T, self.S
    dead = np.zeros((b, s), bool)
    kw, ref_kw, mask = {}, {}, None
    if kind == "lengths":
      kl = np.array([7, s - 4])
      kw = dict(key_value_seq_lengths=jnp.asarray(kl))
      ref_kw = dict(kv_lengths=kl)
      dead = np.arange(s)[None, :] >= kl[:, None]
    elif kind == "bool_mask":
      m = rng.random((b, 1, t, s)) < 0.7
      cols = np.zeros((b, s), bool)
      cols[0, [1, 4, s - 1]] = True
      cols[1, [0, 9]] = True
      m[:, 0][np.broadcast_to(cols[:, None, :], (b, t, s))] = False
      m[:, :, :, 2] = True   # no row fully masked by accident
      mask = jnp.asarray(m)
      dead = cols
    elif kind == "segments":
      if not self.supports_segment_ids:
        pytest.skip("segment ids not supported")
      qs = np.zeros((b, t), np.int32)
      qs[:, t // 2:] = 1
      ks = np.zeros((b, s), np.int32)
      ks[:, s // 3:] = 1
      ks[0, -5:] = 7           # a segment no query carries
      ks[1, :3] = -3
      kw = dict(q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks))
      ref_kw = dict(q_segment_ids=qs, kv_segment_ids=ks)
      dead = (ks == 7) | (ks == -3)
    elif kind == "causal":
      kw, ref_kw = dict(is_causal=True), dict(is_causal=True)
      dead[:, t:] = True       # S > T: keys past the last query
    elif kind == "window":
      kw = dict(local_window_size=(3, 1))
      ref_kw = dict(window=(3, 1))
      dead[:, t + 1:] = True
    elif kind == "lengths_causal":
      ql, kl = np.array([5, t]), np.array([s, 11])
      kw = dict(query_seq_lengths=jnp.asarray(ql),
                key_value_seq_lengths=jnp.asarray(kl), is_causal=True)
      ref_kw = dict(q_lengths=ql, kv_lengths=kl, is_causal=True)
      j = np.arange(s)[None, :]
      dead = (j >= kl[:, None]) | (j >= ql[:, None])
    elif kind in ("bottom_right_window", "offsets_per_batch"):
      if not self.supports_positions:
        pytest.skip("position offsets not supported")
      if kind == "bottom_right_window":
        # Query i at key position i + S - T: keys left of query 0's window
        # are dead.
        kw = dict(is_causal=True, causal_alignment="bottom_right",
                  local_window_size=(2, 0))
        ref_kw = dict(is_causal=True, bottom_right=True, window=(2, 0))
      else:
        qo = np.array([0, 3])
        kw = dict(is_causal=True, q_offset=jnp.asarray(qo), kv_offset=2,
                  local_window_size=(6, 6))
        ref_kw = dict(is_causal=True, q_offset=qo, kv_offset=2, window=(6, 6))
      from tests.reference_np import allowed_np
      dead = ~allowed_np(t, s, batch=b, **ref_kw).any(axis=(1, 2))
    assert self.S > self.T + 1 and dead.any()
    return kw, ref_kw, mask, dead

  @pytest.mark.parametrize("kind", ["lengths", "bool_mask", "segments",
                                    "causal", "window", "lengths_causal",
                                    "bottom_right_window",
                                    "offsets_per_batch"])
  def test_masked_slot_invariance(self, kind):
    """NaN / Inf planted in key and value slots that no query may attend
    change no output and no gradient, and the gradients at those slots are
    exactly zero."""
    dtype = self._dtypes()[0]
    rng = np.random.default_rng(21)
    q, k, v = self._inputs(dtype, seed=21)
    kw, ref_kw, mask, dead = self._dead_slot_case(kind, rng)
    d4 = dead[:, :, None, None]
    # Planted with NumPy (a jnp op writing inf would itself trip debug_infs).
    plant = lambda x, val: jnp.asarray(
        np.where(d4, val, np.asarray(x, np.float32)), dtype)
    bad_pairs = [(plant(k, np.nan), plant(v, np.inf)),
                 (plant(k, -np.inf), plant(v, np.nan)),
                 (plant(k, 1e30), plant(v, -3e38))]
    dout = _rand(98, q.shape, jnp.float32)

    @jax.jit   # one compile for the clean and the three planted runs
    def run(k, v):
      def loss(q, k, v):
        out = self.attention(q, k, v, None, mask, **kw)
        return jnp.sum(out.astype(jnp.float32) * dout), out
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2),
                                           has_aux=True)(q, k, v)
      return out, grads

    clean_out, clean_g = run(k, v)
    ref = attention_np(q, k, v, mask=mask, dout=dout, **ref_kw)
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(clean_out, np.float64), ref["out"],
                               atol=atol, rtol=rtol)
    for kb, vb in bad_pairs:
      out, grads = run(kb, vb)
      np.testing.assert_array_equal(np.asarray(out, np.float32),
                                    np.asarray(clean_out, np.float32))
      for name, g, g0 in zip(("dq", "dk", "dv"), grads, clean_g):
        g = np.asarray(g, np.float32)
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, np.asarray(g0, np.float32), atol=1e-6,
                                   rtol=1e-6, err_msg=name)
      for name, g in (("dk", grads[1]), ("dv", grads[2])):
        g = np.asarray(g, np.float32)
        assert np.all(g[dead] == 0.0), f"{name} nonzero at masked slots"

  def test_all_neg_inf_bias_row_gives_zeros(self):
    """A row whose bias is -inf everywhere has nothing to attend to: zeros
    (not NaN) and finite gradients, in every backend; other rows as the
    reference."""
    if not self.supports_bias:
      pytest.skip("bias not supported")
    self._skip_or_lift_debug_infs(
        "the -inf bias itself is an inf under debug_infs")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=22)
    bias = np.array(_rand(23, (self.B, 1, self.T, self.S), jnp.float32))
    bias[0, :, 3, :] = -np.inf
    bias[1, :, 0, :] = -np.inf
    bias[1, :, 5, ::2] = -np.inf     # partly -inf: ordinary row
    allowed = np.isfinite(bias)
    ref = attention_np(q, k, v, np.where(allowed, bias, 0.0), mask=allowed)
    out = self.attention(q, k, v, jnp.asarray(bias))
    out32 = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out32))
    assert np.all(out32[0, 3] == 0.0) and np.all(out32[1, 0] == 0.0)
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref["out"],
                               atol=atol, rtol=rtol)
    grads = jax.grad(lambda q, k, v: jnp.sum(self.attention(
        q, k, v, jnp.asarray(bias)).astype(jnp.float32)),
        argnums=(0, 1, 2))(q, k, v)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g, np.float32)))

  @pytest.mark.parametrize("which", ["batch", "q_len", "kv_len"])
  def test_empty_inputs(self, which):
    """Batch 0 and zero-length sequences give the correctly shaped zeros
    (a zero-length key sequence leaves nothing to attend to)."""
    dtype = self._dtypes()[0]
    b, t, s = {"batch": (0, 5, 7), "q_len": (2, 0, 7),
               "kv_len": (2, 5, 0)}[which]
    q = jnp.ones((b, t, 4, 8), dtype)
    k = jnp.ones((b, s, 2, 8), dtype)
    v = jnp.ones((b, s, 2, 8), dtype)
    out = self.attention(q, k, v, is_causal=True)
    assert out.shape == (b, t, 4, 8) and out.dtype == dtype
    assert np.all(np.asarray(out, np.float32) == 0.0)
    g = jax.grad(lambda q: jnp.sum(self.attention(q, k, v).astype(
        jnp.float32)))(q)
    assert g.shape == q.shape

  def test_value_head_dim_differs(self):
    if not self.supports_value_head_dim:
      pytest.skip("value head_dim must equal query head_dim here")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, hv=8, seed=12)
    self._check_values(dtype, q, k, v)
    self._check_grads(dtype, q, k, v)

  def test_jit_and_vmap(self):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=13)
    ref = self.attention(q, k, v, is_causal=True)
    jitted = jax.jit(functools.partial(self.attention, is_causal=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(jitted, np.float32),
                               np.asarray(ref, np.float32), atol=1e-5, rtol=1e-5)
    # vmap over the batch with unbatched [T, N, H] inputs.
    vm = jax.vmap(functools.partial(self.attention, is_causal=True))(q, k, v)
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(vm, np.float32),
                               np.asarray(ref, np.float32), atol=atol, rtol=atol)
    # vmap over an extra leading axis of batched inputs, with grads.
    stack = lambda x: jnp.stack([x, x[::-1]])
    g = jax.vmap(jax.grad(lambda q, k, v: jnp.sum(
        self.attention(q, k, v).astype(jnp.float32) ** 2)))(
            stack(q), stack(k), stack(v))
    g0 = jax.grad(lambda q: jnp.sum(
        self.attention(q, k, v).astype(jnp.float32) ** 2))(q)
    np.testing.assert_allclose(np.asarray(g[0], np.float32),
                               np.asarray(g0, np.float32), atol=10 * atol,
                               rtol=10 * atol)

  def test_invalid_shapes_raise_value_error(self):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype)
    cases = [
        ((q[..., :8], k, v), {}, "key"),                  # head_dim mismatch
        ((q, k[:, :5], v), {}, "value"),                   # kv_len mismatch
        ((q, k[:1], v[:1]), {}, "batch"),                  # batch mismatch
        ((q[:, :, :3], k, v), {}, "heads"),                # 3 % 2 != 0
        ((q[0, 0], k, v), {}, "query"),                    # bad rank
        ((q, k, v), dict(mask=jnp.ones((3, 5), bool)), "mask"),
        ((q, k, v), dict(bias=jnp.ones((self.T + 1, self.S))), "bias"),
        ((q, k, v), dict(mask=jnp.ones((self.T, self.S), jnp.int32)), "mask"),
        ((q, k, v), dict(local_window_size=(-1, 2)), "local_window_size"),
        ((q, k, v), dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)),
         "key_value_seq_lengths"),
        ((q, k, v), dict(logits_soft_cap=-1.0), "logits_soft_cap"),
        ((q, k, v), dict(sinks=jnp.zeros((self.N + 1,))), "sinks"),
        ((q, k, v), dict(sinks=jnp.zeros((self.N,), jnp.int32)), "sinks"),
        ((q, k, v), dict(is_causal=True, causal_alignment="left"),
         "causal_alignment"),
        ((q, k, v), dict(is_causal=True, causal_alignment="bottom_right",
                         q_offset=1), "q_offset"),
        ((q, k, v), dict(is_causal=True, q_offset=jnp.zeros((3,), jnp.int32)),
         "q_offset"),
        ((q, k, v), dict(is_causal=True, kv_offset=jnp.asarray(1.5)),
         "kv_offset"),
        ((q, k, v), dict(precision="bogus"), "precision"),
        ((q[None], k[None, :1], v[None, :1]), {}, "batch dims"),
    ]
    for args, kw, needle in cases:
      with pytest.raises(ValueError) as e:
        self.attention(*args, **kw)
      assert needle in str(e.value), (needle, str(e.value))

  def test_refusals_are_not_implemented(self):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype)
    refusals = []
    if not self.supports_dropout:
      refusals.append(dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)))
    if not self.supports_bias:
      refusals.append(dict(bias=jnp.zeros((self.T, self.S))))
    if not self.supports_soft_cap:
      refusals.append(dict(logits_soft_cap=5.0))
    if not self.supports_sinks:
      refusals.append(dict(sinks=jnp.zeros((self.N,))))
    if not self.supports_positions:
      refusals += [dict(is_causal=True, causal_alignment="bottom_right"),
                   dict(is_causal=True, q_offset=2),
                   dict(local_window_size=3, kv_offset=jnp.asarray([1, 0]))]
    if not self.supports_precision:
      refusals.append(dict(precision="highest"))
    for kw in refusals:
      with pytest.raises(NotImplementedError):
        self.attention(q, k, v, **kw)

  # ------------------------------------ options beyond jax.nn (issue 17)
  def _check_option(self, dtype, q, k, v, bias=None, mask=None, sinks=None,
                    kw=None, ref_kw=None):
    """Values and gradients w.r.t. q, k, v (bias, sinks) under jax.jit
    against the float64 reference."""
    kw, ref_kw = dict(kw or {}), dict(ref_kw or {})
    dout = _rand(97, q.shape[:-1] + (v.shape[-1],), jnp.float32)

    def f(q, k, v, bias, sinks):
      extra = {} if sinks is None else dict(sinks=sinks)
      return self.attention(q, k, v, bias, mask, **kw, **extra)

    def loss(*args):
      return jnp.sum(f(*args).astype(jnp.float32) * dout)

    args = (q, k, v, bias, sinks)
    argnums = tuple(i for i, x in enumerate(args) if x is not None)
    out = jax.jit(f)(*args)
    grads = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    ref = attention_np(q, k, v, bias, mask=mask, sinks=sinks, dout=dout,
                       **ref_kw)
    assert out.dtype == q.dtype
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref["out"],
                               atol=atol, rtol=rtol)
    names = ["dq", "dk", "dv", "dbias", "dsinks"]
    for i, g in zip(argnums, grads):
      assert g.dtype == args[i].dtype, (names[i], g.dtype)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), names[i]
      err = _rel_err(g, ref[names[i]])
      assert err < _grad_tol(dtype), f"{names[i]}: relative error {err}"
    return out, ref, grads

  def test_logits_soft_cap(self):
    """cap * tanh((scale q.k + bias) / cap), values and grads (incl. the
    bias), causal; the cap is small enough to change the result."""
    if not self.supports_soft_cap:
      pytest.skip("logits_soft_cap not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=40, scale=2.0)
    bias = _rand(41, (1, self.N, self.T, self.S), jnp.float32) \
        if self.supports_bias else None
    _, ref, _ = self._check_option(
        dtype, q, k, v, bias, kw=dict(logits_soft_cap=2.0, is_causal=True),
        ref_kw=dict(soft_cap=2.0, is_causal=True))
    plain = attention_np(q, k, v, bias, is_causal=True)
    assert np.abs(plain["out"] - ref["out"]).max() > 0.05   # the cap acts

  def test_sinks(self):
    """Per-head sink logits: values, grads w.r.t. q, k, v and the sinks; a
    fully masked row gives zeros and (with the lse) lse = its sink."""
    if not self.supports_sinks:
      pytest.skip("sinks not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=42)
    sinks = jnp.asarray(np.linspace(-1.0, 2.5, self.N), jnp.float32)
    mask = np.ones((self.B, 1, self.T, self.S), bool)
    mask[1, :, 4, :] = False
    mask = jnp.asarray(mask)
    out, ref, _ = self._check_option(dtype, q, k, v, mask=mask, sinks=sinks)
    assert np.all(np.asarray(out[1, 4], np.float32) == 0.0)
    assert ref["p_sink"].mean() > 0.03      # the sinks take real mass
    if self.supports_lse:
      _, lse = self.attention_with_lse(q, k, v, mask=mask, sinks=sinks)
      np.testing.assert_allclose(np.asarray(lse), ref["lse"],
                                 atol=5e-4 if dtype == jnp.float32 else 5e-2)
      np.testing.assert_allclose(np.asarray(lse[1, :, 4]), np.asarray(sinks),
                                 atol=1e-6)

  @pytest.mark.parametrize("case", ["bottom_right_t_gt_s", "offsets"])
  def test_positions(self, case):
    """Bottom-right alignment with T > S (the first T - S queries see
    nothing: zeros) and static q/kv offsets with a window; values, grads."""
    if not self.supports_positions:
      pytest.skip("position offsets not supported")
    dtype = self._dtypes()[0]
    if case == "bottom_right_t_gt_s":
      q, k, v = self._inputs(dtype, t=self.S, s=self.T, seed=43)
      kw = dict(is_causal=True, causal_alignment="bottom_right")
      ref_kw = dict(is_causal=True, bottom_right=True)
    else:
      q, k, v = self._inputs(dtype, seed=44)
      kw = dict(is_causal=True, q_offset=7, kv_offset=3,
                local_window_size=(5, 2))
      ref_kw = dict(is_causal=True, q_offset=7, kv_offset=3, window=(5, 2))
    out, _, _ = self._check_option(dtype, q, k, v, kw=kw, ref_kw=ref_kw)
    if case == "bottom_right_t_gt_s":
      assert np.all(np.asarray(out[:, :self.S - self.T], np.float32) == 0.0)

  def test_leading_batch_dims(self):
    """[..., T, N, H] inputs: two batch dims, a bias broadcast over the
    first, per-example kv lengths; values, grads and lse."""
    dtype = self._dtypes()[0]
    t, s, n, kh, h = 6, 9, self.N, self.K, self.H
    q = _rand(50, (2, 3, t, n, h), dtype)
    k = _rand(51, (2, 3, s, kh, h), dtype)
    v = _rand(52, (2, 3, s, kh, h), dtype)
    bias = _rand(53, (3, 1, t, s), jnp.float32) if self.supports_bias else None
    lengths = np.array([[s, 4, 7], [2, s, 5]])
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.asarray(lengths))
    dout = _rand(54, (2, 3, t, n, h), jnp.float32)
    flat = lambda x: None if x is None else np.asarray(
        x, np.float64).reshape((6,) + x.shape[2:])
    fbias = None if bias is None else np.broadcast_to(
        np.asarray(bias, np.float64), (2, 3, 1, t, s)).reshape(6, 1, t, s)
    ref = attention_np(flat(q), flat(k), flat(v), fbias, is_causal=True,
                       kv_lengths=lengths.reshape(6), dout=flat(dout))
    out = jax.jit(lambda q, k, v, bias: self.attention(q, k, v, bias, **kw))(
        q, k, v, bias)
    assert out.shape == (2, 3, t, n, h) and out.dtype == dtype
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(flat(out), ref["out"], atol=atol, rtol=rtol)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = jax.jit(jax.grad(lambda q, k, v, bias: jnp.sum(self.attention(
        q, k, v, bias, **kw).astype(jnp.float32) * dout), argnums=argnums))(
            q, k, v, bias)
    for name, g in zip(("dq", "dk", "dv"), grads):
      assert g.shape == {"dq": q, "dk": k, "dv": v}[name].shape
      assert _rel_err(flat(g), ref[name]) < _grad_tol(dtype), name
    if bias is not None:
      rb = ref["dbias"].reshape(2, 3, 1, t, s).sum(0)
      assert _rel_err(grads[3], rb) < _grad_tol(dtype), "dbias"
    if self.supports_lse:
      _, lse = self.attention_with_lse(q, k, v, bias, **kw)
      assert lse.shape == (2, 3, n, t)
      np.testing.assert_allclose(flat(lse), ref["lse"],
                                 atol=5e-4 if dtype == jnp.float32 else 5e-2)

  def test_precision(self):
    """precision= reaches every matmul, forward and backward: a (q.k, p.v)
    pair of different precisions shows up as exactly those two in the
    jaxpr of the gradient; values and grads match the reference."""
    if not self.supports_precision:
      pytest.skip("precision not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=55)
    self._check_option(dtype, q, k, v, kw=dict(precision="highest"))
    f = lambda q, k, v: jnp.sum(self.attention(
        q, k, v, is_causal=True, precision=("highest", "high")).astype(
            jnp.float32))
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    precisions = [e.params["precision"] for e in _walk_eqns(jaxpr.jaxpr)
                  if e.primitive.name == "dot_general"]
    assert len(precisions) >= 6, precisions     # 2 forward, 4 backward
    seen = {p for pair in precisions for p in (pair if isinstance(
        pair, tuple) else (pair,))}
    H, HI = jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGH
    assert seen == {H, HI}, seen

  def test_lse_layout_and_gradient(self):
    """lse_layout='BTN' is the transpose and matches jax.nn's residual;
    lse_gradient=True gives the reference gradient of the lse, False
    none (stop-gradient, as jax.nn)."""
    if not self.supports_lse:
      pytest.skip("lse not supported")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=56)
    _, lse = self.attention_with_lse(q, k, v, is_causal=True)
    _, btn = self.attention_with_lse(q, k, v, is_causal=True,
                                     lse_layout="BTN", lse_gradient=False)
    assert btn.shape == (self.B, self.T, self.N)
    np.testing.assert_array_equal(np.asarray(btn),
                                  np.swapaxes(np.asarray(lse), 1, 2))
    if dtype != jnp.bfloat16:
      _, res = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            return_residual=True)
      np.testing.assert_allclose(np.asarray(btn), np.asarray(res, np.float32),
                                 atol=1e-4, rtol=1e-5)
    dlse = _rand(57, (self.B, self.N, self.T), jnp.float32)
    lse_of = lambda q, k, **kw: self.attention_with_lse(
        q, k, v, is_causal=True, **kw)[1]
    g = jax.jit(jax.grad(lambda q, k: jnp.sum(lse_of(q, k) * dlse),
                         (0, 1)))(q, k)
    ref = attention_np(q, k, v, is_causal=True, dlse=dlse,
                       dout=np.zeros(q.shape[:-1] + (v.shape[-1],)))
    for name, gi in zip(("dq", "dk"), g):
      assert _rel_err(gi, ref[name]) < _grad_tol(dtype), name
    g0 = jax.jit(jax.grad(lambda q: jnp.sum(jnp.swapaxes(lse_of(
        q, k, lse_layout="BTN", lse_gradient=False), 1, 2) * dlse)))(q)
    assert np.all(np.asarray(g0, np.float32) == 0.0)
    with pytest.raises(ValueError, match="lse_layout"):
      self.attention_with_lse(q, k, v, lse_layout="NTB")

  def test_merge_attentions_equals_whole(self):
    """Keys split in two parts (the second with kv_offset so causal masking
    stays global, the sinks given to one part) and merged with
    merge_attentions equal attention over all keys: values, lse (-inf rows
    included) and gradients through the merge."""
    if not self.supports_lse:
      pytest.skip("lse not supported")
    self._skip_or_lift_debug_infs("empty part rows have lse -inf")
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, seed=58)
    s1 = 10
    causal = self.supports_positions
    sinks = (jnp.asarray(np.linspace(-0.5, 1.0, self.N), jnp.float32)
             if self.supports_sinks else None)
    m = np.ones((1, 1, self.T, self.S), bool)
    m[..., 5, :] = False                       # empty in both parts
    mask = jnp.asarray(m)
    dout = _rand(59, q.shape, jnp.float32)
    dlse = _rand(60, (self.B, self.N, self.T), jnp.float32)

    def merged(q, k, v, sinks):
      kw1 = dict(is_causal=causal)
      if sinks is not None:
        kw1["sinks"] = sinks
      kw2 = dict(is_causal=True, kv_offset=s1) if causal else {}
      o1, l1 = self.attention_with_lse(q, k[:, :s1], v[:, :s1],
                                       mask=mask[..., :s1], **kw1)
      o2, l2 = self.attention_with_lse(q, k[:, s1:], v[:, s1:],
                                       mask=mask[..., s1:], **kw2)
      return attnjax.merge_attentions([o1, o2], [l1, l2])

    out, lse = jax.jit(merged)(q, k, v, sinks)
    ref = attention_np(q, k, v, mask=m, is_causal=causal, sinks=sinks,
                       dout=dout, dlse=dlse)
    atol, rtol = _tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref["out"],
                               atol=atol, rtol=rtol)
    assert np.all(np.asarray(out[:, 5], np.float32) == 0.0)
    if sinks is None:
      assert np.all(np.isneginf(np.asarray(lse[:, :, 5])))
    fin = np.isfinite(ref["lse"])
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], ref["lse"][fin],
                               atol=5e-4 if dtype == jnp.float32 else 5e-2)

    def loss(q, k, v, sinks):
      o, l = merged(q, k, v, sinks)
      l = jnp.where(jnp.isfinite(l), l, 0.0)
      return jnp.sum(o.astype(jnp.float32) * dout) + jnp.sum(l * dlse)

    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, sinks)
    for name, g in zip(("dq", "dk", "dv", "dsinks"), grads):
      assert np.all(np.isfinite(np.asarray(g, np.float32))), name
      assert _rel_err(g, ref[name]) < _grad_tol(dtype), name

  @pytest.mark.parametrize("dtype", DTYPES)
  def test_options_together_jit_vmap(self, dtype):
    """Every option this backend claims at once (soft cap, sinks,
    bottom-right window, precision): values and grads under jit in f32 and
    bf16, vmap over unbatched inputs, vmap of the gradient."""
    if dtype not in self._dtypes():
      pytest.skip("dtype not served by this backend")
    kw, ref_kw, sinks = {}, {}, None
    if self.supports_soft_cap:
      kw["logits_soft_cap"] = ref_kw["soft_cap"] = 3.0
    if self.supports_sinks:
      sinks = jnp.asarray(np.linspace(-1.0, 1.0, self.N), jnp.float32)
    if self.supports_positions:
      kw.update(is_causal=True, causal_alignment="bottom_right",
                local_window_size=(6, 0))
      ref_kw.update(is_causal=True, bottom_right=True, window=(6, 0))
    if self.supports_precision:
      kw["precision"] = "highest"
    if not kw and sinks is None:
      pytest.skip("none of the options is supported")
    q, k, v = self._inputs(dtype, seed=61, scale=1.5)
    out, _, grads = self._check_option(dtype, q, k, v, sinks=sinks, kw=kw,
                                       ref_kw=ref_kw)
    if sinks is not None:
      kw["sinks"] = sinks
    f = functools.partial(self.attention, **kw)
    vm = jax.jit(jax.vmap(f))(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(vm, np.float32),
                               np.asarray(out, np.float32), atol=tol, rtol=tol)
    # vmap of the gradient over a stacked axis: slice 0 is the gradient
    # checked above against the reference (same loss).
    dout = _rand(97, q.shape[:-1] + (v.shape[-1],), jnp.float32)
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * dout)
    stack = lambda x: jnp.stack([x, x[::-1]])
    g = jax.jit(jax.vmap(jax.grad(loss)))(stack(q), stack(k), stack(v))
    np.testing.assert_allclose(np.asarray(g[0], np.float32),
                               np.asarray(grads[0], np.float32),
                               atol=10 * tol, rtol=10 * tol)

  @hypothesis.settings(max_examples=4, deadline=None,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(t=st.integers(1, 40), s=st.integers(1, 40),
                    kh=st.sampled_from([1, 2]), g=st.sampled_from([1, 2, 3]),
                    causal=st.booleans())
  def test_random_shapes(self, t, s, kh, g, causal):
    dtype = self._dtypes()[0]
    q, k, v = self._inputs(dtype, b=1, t=t, s=s, n=kh * g, kh=kh, h=8, seed=t)
    self._check_values(dtype, q, k, v, is_causal=causal,
                       ref_kw=dict(is_causal=causal))
