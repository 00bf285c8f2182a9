"""Shared checks for the spatial-zoo mechanisms (issue 21): values and
gradients against the plain-jnp reference under jit, vmap, bf16."""

import jax
import jax.numpy as jnp
import numpy as np

F32 = lambda x: x.astype(jnp.float32)


def normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def _vjp_over(f, argnums, ct):
  """run(*args) -> (f(*args), vjp of `ct` w.r.t. args[i], i in argnums)."""
  def run(*args):
    def g(*xs):
      full = list(args)
      for i, x in zip(argnums, xs):
        full[i] = x
      return f(*full)
    out, pull = jax.vjp(g, *(args[i] for i in argnums))
    return out, pull(ct.astype(out.dtype))
  return run


def check_values_grads_jit_vmap(fn, ref, args, *, batched=(0, 1, 2),
                                atol=2e-5, grad_atol=None):
  """fn(*args) vs ref(*args): values and the gradients w.r.t. the `batched`
  args, with fn under jit(vmap(vjp)) over a new leading axis of the
  `batched` args -- jit, vmap and gradients in one compile of fn (they were
  three) -- and ref's values and gradients from one jit(vjp) of ref."""
  batched = tuple(batched)
  ct = normal(99, jax.eval_shape(fn, *args).shape)
  want, want_grads = jax.jit(_vjp_over(ref, batched, ct))(*args)
  axes = tuple(0 if i in batched else None for i in range(len(args)))
  vargs = tuple(a[None] if i in batched else a for i, a in enumerate(args))
  out, grads = jax.jit(jax.vmap(_vjp_over(fn, batched, ct),
                                in_axes=axes))(*vargs)
  out, grads = out[0], [g[0] for g in grads]
  np.testing.assert_allclose(out, want, atol=atol, rtol=atol)
  gtol = 5 * atol if grad_atol is None else grad_atol
  for a, b in zip(grads, want_grads):
    np.testing.assert_allclose(a, b, atol=gtol, rtol=gtol)
  return out


def value_and_grad0(f, args):
  """f(*args) and the gradient of sum(f(*args)) w.r.t. args[0], from one
  compiled program (eager autodiff compiles every op on its own). jax
  arrays are traced; anything else (numbers, NumPy arrays a primitive may
  read at trace time) is closed over, as the eager call saw it."""
  arr = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

  def run(*xs):
    full = list(args)
    for i, x in zip(arr, xs):
      full[i] = x
    out, pull = jax.vjp(lambda x0: f(x0, *full[1:]), full[0])
    return out, pull(jnp.ones_like(out))[0]
  return jax.jit(run)(*(args[i] for i in arr))


def jit_vjp(f, args, ct, argnums=(0, 1, 2)):
  """f(*args) and its vjp of `ct` w.r.t. args[i], i in `argnums` (= the
  gradients of sum(f(*args) * ct)), from one compiled program. `args` are
  arrays or None."""
  return jax.jit(lambda args, ct: _vjp_over(f, argnums, ct)(*args))(
      tuple(args), ct)


def check_bf16(fn, ref, args, *, batched=(0, 1, 2), atol=6e-2):
  """fn on bf16 copies of the `batched` args vs ref in f32: values and the
  gradient of the sum w.r.t. args[0], each side one jit(vjp)."""
  bargs = tuple(a.astype(jnp.bfloat16) if i in batched else a
                for i, a in enumerate(args))
  out, g = value_and_grad0(fn, bargs)
  assert out.dtype == jnp.bfloat16
  fargs = tuple(F32(a) if i in batched else a for i, a in enumerate(bargs))
  want, gr = value_and_grad0(ref, fargs)
  np.testing.assert_allclose(F32(out), want, atol=atol, rtol=atol)
  np.testing.assert_allclose(F32(g), gr, atol=3 * atol, rtol=3 * atol)


def softmax64(logits, ok):
  """float64 NumPy masked softmax over the last axis; empty rows -> 0."""
  logits = np.where(ok, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(ok, np.exp(logits - m), 0.0)
  s = p.sum(-1, keepdims=True)
  return p / np.where(s > 0, s, 1.0)


def dwconv64(x, kernel, bias=None, dilation=1):
  """'same' zero-padded depthwise conv in float64 via scipy.ndimage
  (correlation, one channel at a time): x [B, H, W, C], kernel [k, k, C]."""
  from scipy import ndimage
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh, kw, c = kernel.shape
  dk = np.zeros(((kh - 1) * dilation + 1, (kw - 1) * dilation + 1, c))
  dk[::dilation, ::dilation] = kernel
  out = np.stack([np.stack([ndimage.correlate(x[b, :, :, ch], dk[:, :, ch],
                                              mode="constant", cval=0.0)
                            for ch in range(c)], -1)
                  for b in range(x.shape[0])])
  return out if bias is None else out + np.asarray(bias, np.float64)


def gelu64(x):
  from scipy.special import erf
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))
