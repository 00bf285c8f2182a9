"""Multi-device checks for attnjax.distributed and experiments.sharding.

Run by tests/test_distributed.py in a subprocess whose environment sets
XLA_FLAGS=--xla_force_host_platform_device_count=N before jax initializes, so
the forced host devices never leak into other tests. Usage:

  python tests/distributed_checks.py attention          # needs 8 devices
  python tests/distributed_checks.py ckpt_save DIR      # any N >= 2
  python tests/distributed_checks.py ckpt_restore DIR   # any M >= 1
  python tests/distributed_checks.py attention,ring_window,ckpt_save DIR
                                                   # several groups, one start
  python -m experiments.launch --num_processes=2 --devices_per_process=2 -- \
      python tests/distributed_checks.py mp DIR        # 2 real processes

Each group raises (non-zero exit) on the first failed check and prints one
`OK <name>` line per passed check.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import attnjax
from attnjax.distributed import (from_ring_layout, ring_attention,
                                 ring_permutation, to_ring_layout,
                                 ulysses_attention)


def ok(name):
  print("OK", name, flush=True)


def assert_close(name, got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if got.shape != want.shape:
    raise AssertionError(f"{name}: shape {got.shape} != {want.shape}")
  err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want))) or 1.0
  if not err <= tol * scale:
    raise AssertionError(f"{name}: max abs err {err:.3g} > {tol} * {scale:.3g}")


def expect_value_error(name, fn, needle):
  try:
    fn()
  except ValueError as e:
    if needle not in str(e):
      raise AssertionError(f"{name}: ValueError without {needle!r}: {e}")
    ok(name)
    return
  raise AssertionError(f"{name}: no ValueError raised")


def _inputs(dtype=jnp.float32, b=2, t=32, n=8, k=2, h=8):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  kk = jax.random.normal(ks[1], (b, t, k, h), dtype)
  v = jax.random.normal(ks[2], (b, t, k, h), dtype)
  do = jax.random.normal(ks[3], (b, t, n, h), dtype)
  return q, kk, v, do


def _value_and_grads(fns, q, k, v, do):
  """{name: (out, dq, dk, dv)} for each fn(q, k, v), in one jit."""
  def run(q, k, v, do):
    res = {}
    for name, f in fns.items():
      out, vjp = jax.vjp(f, q, k, v)
      res[name] = (out,) + tuple(vjp(do))
    return res
  return jax.jit(run)(q, k, v, do)


def _reference(q, k, v, do, scale=None):
  ref = lambda c: (lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=c, scale=scale, implementation="xla"))
  return _value_and_grads({"causal": ref(True), "full": ref(False)},
                          q, k, v, do)


def _compare(tag, got, want, tol):
  for part, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(f"{tag} {part}", g, w, tol)
  ok(tag)


def check_attention():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 forced host devices, got {devices}"
  q, k, v, do = _inputs()
  want = _reference(q, k, v, do)

  # Under CI P = 2 and 4 only: P = 4 takes every layout and Ulysses's
  # kv-head repeat path, P = 2 the no-repeat path; P = 8 repeats P = 4's
  # code paths with more ring steps (8-device meshes still run below:
  # permuted inputs). The full sweep without CI.
  for p in (2, 4) if os.environ.get("CI") else (2, 4, 8):
    mesh = Mesh(np.array(devices[:p]), ("seq",))
    fns = {}
    layouts = ("zigzag", "striped", "contiguous") if p == 4 else ("zigzag",)
    for lay in layouts:
      fns[f"ring causal {lay}"] = (
          lambda q, k, v, lay=lay: ring_attention(
              q, k, v, mesh=mesh, axis_name="seq", is_causal=True,
              layout=lay))
    fns["ring full"] = lambda q, k, v: ring_attention(
        q, k, v, mesh=mesh, axis_name="seq")
    # 8 query heads, 2 kv heads: p=4, 8 take the kv-head repeat path.
    fns["ulysses causal"] = lambda q, k, v: ulysses_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=True)
    fns["ulysses full"] = lambda q, k, v: ulysses_attention(
        q, k, v, mesh=mesh, axis_name="seq", implementation="chunked")
    got = _value_and_grads(fns, q, k, v, do)
    for name, res in got.items():
      shard_devices = res[0].sharding.device_set
      if len(shard_devices) != p:
        raise AssertionError(f"{name} P={p}: output on {len(shard_devices)} "
                             "devices, not sharded over the mesh")
      _compare(f"{name} P={p}", res, want["causal" if "causal" in name
                                          else "full"], 2e-5)

  # Data parallel x context parallel, on an Explicit-axes mesh.
  mesh = jax.make_mesh((2, 4), ("data", "seq"))
  fns = {
      "ring causal (data=2, seq=4)": lambda q, k, v: ring_attention(
          q, k, v, mesh=mesh, axis_name="seq", is_causal=True,
          batch_axis="data"),
      "ulysses causal (data=2, seq=4)": lambda q, k, v: ulysses_attention(
          q, k, v, mesh=mesh, axis_name="seq", is_causal=True,
          batch_axis="data"),
  }
  got = _value_and_grads(fns, q, k, v, do)
  for name, res in got.items():
    spec = res[0].sharding.spec
    if tuple(spec)[:2] != ("data", "seq"):
      raise AssertionError(f"{name}: output spec {spec}")
    _compare(name, res, want["causal"], 2e-5)

  # Inputs kept in ring order (permuted=True), custom scale, striped, p=8.
  mesh = Mesh(np.array(devices), ("seq",))
  for lay in ("zigzag", "striped"):
    fn = jax.jit(lambda q, k, v, lay=lay: ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=True, scale=0.3,
        layout=lay, permuted=True))
    perm = lambda x: to_ring_layout(x, 8, lay)
    out = from_ring_layout(fn(perm(q), perm(k), perm(v)), 8, lay)
    want_s = attnjax.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert_close(f"ring permuted {lay}", out, want_s, 2e-5)
    ok(f"ring permuted {lay} P=8")

  # bfloat16 in, bfloat16 out, close to the float32 result.
  qb, kb, vb, dob = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
  mesh = Mesh(np.array(devices[:4]), ("seq",))
  got = _value_and_grads({"ring": lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", is_causal=True)}, qb, kb, vb, dob)
  res = got["ring"]
  if any(x.dtype != jnp.bfloat16 for x in res):
    raise AssertionError(f"bf16 dtypes {[x.dtype for x in res]}")
  _compare("ring causal bf16 P=4", res, want["causal"], 3e-2)

  # Under vmap (an extra leading axis), values and gradients.
  stack = lambda x: jnp.stack([x, x[::-1] * 0.5])
  qs, ks_, vs, dos = (stack(x) for x in (q, k, v, do))
  vring = jax.vmap(lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", is_causal=True))
  vref = jax.vmap(lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"))
  got = _value_and_grads({"ring": vring, "ref": vref}, qs, ks_, vs, dos)
  _compare("ring causal under vmap P=4", got["ring"], got["ref"], 2e-5)

  # Cross-attention (T != S), non-causal.
  ks = jax.random.split(jax.random.key(1), 2)
  k2 = jax.random.normal(ks[0], (2, 16, 2, 8))
  v2 = jax.random.normal(ks[1], (2, 16, 2, 8))
  out = jax.jit(lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq"))(q, k2, v2)
  assert_close("ring cross", out, attnjax.dot_product_attention(q, k2, v2),
               2e-5)
  ok("ring cross-attention T=32 S=16 P=4")

  # Placements and errors.
  perm = ring_permutation(16, 4, "zigzag")
  np.testing.assert_array_equal(
      perm.reshape(4, 4), [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11],
                           [6, 7, 8, 9]])
  np.testing.assert_array_equal(ring_permutation(8, 4, "striped"),
                                [0, 4, 1, 5, 2, 6, 3, 7])
  x = jnp.arange(2 * 24).reshape(2, 24)
  for lay in ("zigzag", "striped"):
    np.testing.assert_array_equal(
        from_ring_layout(to_ring_layout(x, 4, lay), 4, lay), x)
  ok("ring_permutation")
  mesh = Mesh(np.array(devices[:4]), ("seq",))
  expect_value_error("err axis", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="sp"), "axis_name")
  expect_value_error("err divisible", lambda: ring_attention(
      q[:, :30], k[:, :30], v[:, :30], mesh=mesh, axis_name="seq"),
                     "divisible")
  expect_value_error("err zigzag", lambda: ring_attention(
      q[:, :12], k[:, :12], v[:, :12], mesh=mesh, axis_name="seq",
      is_causal=True), "2 * 4")
  # Packed sequences: segment ids, causal (every layout) and not, P=4; the
  # last ids of the keys mark padding no query uses.
  mesh4 = Mesh(np.array(jax.devices()[:4]), ("seq",))
  qseg = jnp.asarray(np.repeat([[0] * 5 + [1] * 11 + [2] * 16],
                               2, axis=0).astype(np.int32))
  qseg = qseg.at[1].set(jnp.asarray([0] * 12 + [1] * 20, jnp.int32))
  kvseg = qseg.at[:, -3:].set(9)
  ref_seg = lambda c: (lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=c, q_segment_ids=qseg, kv_segment_ids=kvseg,
      implementation="xla"))
  want_seg = _value_and_grads({"causal": ref_seg(True),
                               "full": ref_seg(False)}, q, k, v, do)
  fns = {f"ring segments causal {lay}": (
      lambda q, k, v, lay=lay: ring_attention(
          q, k, v, mesh=mesh4, axis_name="seq", is_causal=True, layout=lay,
          q_segment_ids=qseg, kv_segment_ids=kvseg))
         for lay in ("zigzag", "striped", "contiguous")}
  fns["ring segments full"] = lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh4, axis_name="seq", q_segment_ids=qseg,
      kv_segment_ids=kvseg)
  fns["ulysses segments causal"] = lambda q, k, v: ulysses_attention(
      q, k, v, mesh=mesh4, axis_name="seq", is_causal=True,
      q_segment_ids=qseg, kv_segment_ids=kvseg)
  got = _value_and_grads(fns, q, k, v, do)
  for name, res in got.items():
    _compare(f"{name} P=4", res, want_seg["causal" if "causal" in name
                                          else "full"], 2e-5)
  expect_value_error("err segments", lambda: ring_attention(
      q, k, v, mesh=mesh4, axis_name="seq", q_segment_ids=qseg),
                     "segment_ids")
  expect_value_error("err segment shape", lambda: ring_attention(
      q, k, v, mesh=mesh4, axis_name="seq", q_segment_ids=qseg[:, :8],
      kv_segment_ids=kvseg), "q_segment_ids")

  expect_value_error("err causal cross", lambda: ring_attention(
      q, k2, v2, mesh=mesh, axis_name="seq", is_causal=True), "equal")
  expect_value_error("err layout", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", layout="spiral"), "layout")
  expect_value_error("err heads", lambda: ulysses_attention(
      q[:, :, :2], k[:, :, :1], v[:, :, :1], mesh=mesh, axis_name="seq"),
                     "heads")
  expect_value_error("err batch axis", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", batch_axis="seq"), "batch_axis")


def check_ring_window():
  """Ring attention with local windows (4 devices, shards of 8): values and
  gradients vs single-device attention, causal sliding and asymmetric
  two-sided windows reaching 0, 1, 2 and all shards; with segment ids and
  NaN/Inf in padded key/value slots; argument errors."""
  devices = jax.devices()
  assert len(devices) >= 4, devices
  mesh = Mesh(np.array(devices[:4]), ("seq",))
  q, k, v, do = _inputs()
  cases = [(True, 5), (True, 12), (True, (7, 3)), (False, (3, 9)),
           (False, (20, 0)), (False, 2), (True, 40)]
  fns, refs = {}, {}
  for causal, w in cases:
    name = f"ring window {w} causal={causal}"
    fns[name] = (lambda q, k, v, c=causal, w=w: ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=c,
        local_window_size=w, block_q=4, block_kv=8))
    refs[name] = (lambda q, k, v, c=causal, w=w: attnjax.dot_product_attention(
        q, k, v, is_causal=c, local_window_size=w, implementation="xla"))
  got = _value_and_grads(fns, q, k, v, do)
  want = _value_and_grads(refs, q, k, v, do)
  for name in fns:
    _compare(name + " P=4", got[name], want[name], 2e-5)
  # Packed sequences with garbage in the padded kv slots.
  qseg = np.repeat([[0] * 5 + [1] * 11 + [2] * 16], 2, axis=0).astype(np.int32)
  kvseg = qseg.copy()
  kvseg[:, -3:] = 9
  kb = np.asarray(k).copy()
  vb = np.asarray(v).copy()
  kb[:, -3:], vb[:, -3:] = np.nan, np.inf
  seg = dict(q_segment_ids=qseg, kv_segment_ids=kvseg)
  got = _value_and_grads({"r": lambda q, k, v: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", is_causal=True,
      local_window_size=9, **seg)}, q, kb, vb, do)["r"]
  want = _value_and_grads({"r": lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=9, implementation="xla",
      **seg)}, q, k, v, do)["r"]
  _compare("ring window segments nan-padded kv P=4", got, want, 2e-5)
  expect_value_error("err window cross", lambda: ring_attention(
      q, k[:, :16], v[:, :16], mesh=mesh, axis_name="seq",
      local_window_size=3), "equal")
  expect_value_error("err window permuted zigzag", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", is_causal=True, permuted=True,
      local_window_size=3), "contiguous")
  expect_value_error("err window negative", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", local_window_size=-1),
                     "local_window_size")
  expect_value_error("err block_q", lambda: ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", block_q=0), "block_q")


# ----------------------------------------------------------------------------
# Sharded training: save on N devices, restore on M devices.
# ----------------------------------------------------------------------------

MESH_BY_COUNT = {8: "data:2,seq:4", 4: "data:2,seq:2", 2: "data:1,seq:2",
                 1: "data:1,seq:1"}


def _train_setup(mesh_spec):
  import optax
  from flax import nnx
  from attnjax.distributed import sequence_parallel_attention_fn
  from experiments import sharding

  mesh = sharding.make_mesh(mesh_spec)
  attn = sequence_parallel_attention_fn(mesh, "seq", kind="ring",
                                        batch_axis="data")
  model = attnjax.TransformerEncoder(2, 16, 4, mlp_dim=32, attention_fn=attn,
                                     rngs=nnx.Rngs(0))
  # eps well above the float noise of gradients that are exactly zero in
  # exact arithmetic (key biases: softmax is shift-invariant), which Adam
  # would otherwise blow up into different-but-valid updates per mesh.
  opt = nnx.Optimizer(model, optax.adam(1e-2, eps=1e-4), wrt=nnx.Param)
  sharding.shard_nnx(model, opt, mesh=mesh, fsdp_axis="data", min_size=0)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(model):
      return jnp.mean((model(x, is_causal=True) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  def batch(i):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(7), i))
    x = np.asarray(jax.random.normal(kx, (4, 16, 16)))
    y = np.asarray(jax.random.normal(ky, (4, 16, 16)))
    return sharding.global_batch((x, y), mesh, seq_axis="seq")

  return mesh, model, opt, step, batch


def _flat_params(model):
  from flax import nnx
  from experiments import sharding
  leaves = jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param).to_pure_dict())
  values = sharding.fetch([x for _, x in leaves])
  return {jax.tree_util.keystr(p): np.asarray(x)
          for (p, _), x in zip(leaves, values)}


def check_ckpt_save(workdir):
  from experiments.common import Checkpointer, nnx_state
  n = len(jax.devices())
  mesh, model, opt, step, batch = _train_setup(MESH_BY_COUNT[n])
  for i in range(3):
    loss = step(model, opt, *batch(i))
  kernel = model.blocks[0].attn.query.kernel.value
  if len(kernel.sharding.device_set) != n:
    raise AssertionError(f"params live on {kernel.sharding.device_set}")
  from experiments import sharding
  drawn = jax.jit(lambda key: sharding.constrain_batch(
      jax.random.normal(key, (4, 16, 16)), mesh, seq_axis="seq"))(
          jax.random.key(3))
  if tuple(drawn.sharding.spec)[:2] != ("data", "seq"):
    raise AssertionError(f"constrain_batch gave {drawn.sharding}")
  table = sharding.replicate({"x": np.ones((3, 5))}, mesh)["x"]
  if len(table.sharding.device_set) != n or not table.sharding.is_fully_replicated:
    raise AssertionError(f"replicate gave {table.sharding}")
  ckpt = Checkpointer(workdir)
  ckpt.save(3, {"nnx": nnx_state(model, opt)})
  ckpt.close()
  main = jax.process_index() == 0
  at_save = _flat_params(model)
  step(model, opt, *batch(3))
  nxt = _flat_params(model)
  if main:
    np.savez(os.path.join(workdir, "params_at_save.npz"), **at_save)
    np.savez(os.path.join(workdir, "params_next.npz"), **nxt)
  where = f"{n} devices"
  if jax.process_count() > 1:
    local = len(kernel.addressable_shards)
    if local >= n:
      raise AssertionError(f"kernel not sharded across processes: {local} "
                           f"local shards of {n}")
    where += f" of {jax.process_count()} processes"
  ok(f"ckpt_save on {where} (loss {float(np.asarray(sharding.fetch(loss))):.4f})")


def check_ckpt_restore(workdir):
  from experiments.common import Checkpointer, nnx_load, nnx_state
  m = len(jax.devices())
  mesh, model, opt, step, batch = _train_setup(MESH_BY_COUNT[m])
  ckpt = Checkpointer(workdir)
  restored_step, state = ckpt.restore_or({"nnx": nnx_state(model, opt)})
  if restored_step != 3:
    raise AssertionError(f"restored step {restored_step}, expected 3")
  nnx_load((model, opt), state["nnx"])
  kernel = model.blocks[0].attn.query.kernel.value
  if kernel.sharding.mesh.devices.size != m:
    raise AssertionError(f"restored onto {kernel.sharding}")
  saved = np.load(os.path.join(workdir, "params_at_save.npz"))
  got = _flat_params(model)
  if set(saved.files) != set(got):
    raise AssertionError(f"param names differ: {set(saved.files) ^ set(got)}")
  for name in saved.files:
    np.testing.assert_array_equal(got[name], saved[name], err_msg=name)
  ok(f"ckpt_restore on {m} devices: params identical")
  step(model, opt, *batch(3))
  nxt = np.load(os.path.join(workdir, "params_next.npz"))
  got = _flat_params(model)
  for name in nxt.files:
    np.testing.assert_allclose(got[name], nxt[name], rtol=2e-5, atol=2e-6,
                               err_msg=name)
  ok(f"ckpt_restore on {m} devices: next step matches the saving run")


# ----------------------------------------------------------------------------
# Real processes (run under `python -m experiments.launch`, 2 x 2 devices).
# ----------------------------------------------------------------------------


def check_mp_attention():
  """Ring and Ulysses over a mesh axis spanning processes vs one device."""
  from experiments import sharding
  sharding.maybe_initialize_distributed()
  nproc, ndev = jax.process_count(), jax.device_count()
  if nproc < 2:
    raise AssertionError(f"expected >= 2 processes, got {nproc}")
  q, k, v, do = (np.asarray(x) for x in _inputs())
  qseg = np.repeat([[0] * 5 + [1] * 11 + [2] * 16], 2, axis=0).astype(np.int32)
  qseg[1] = [0] * 12 + [1] * 20
  kvseg = qseg.copy()
  kvseg[:, -3:] = 9          # key padding: no query uses id 9
  # Garbage in the padded key/value slots must not reach any output/gradient.
  k_bad, v_bad = k.copy(), v.copy()
  k_bad[:, -3:] = np.nan
  v_bad[:, -3:] = np.inf
  # The reference: single-device attention on this process's first device.
  local = jax.local_devices()[0]
  with jax.default_device(local):
    want = _reference(q, k, v, do)
    ref_seg = lambda c: (lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=c, q_segment_ids=qseg, kv_segment_ids=kvseg,
        implementation="xla"))
    want_seg = _value_and_grads({"causal": ref_seg(True)}, q, k, v, do)
    want = {k_: jax.tree_util.tree_map(np.asarray, v_)
            for k_, v_ in want.items()}
    want_seg = {k_: jax.tree_util.tree_map(np.asarray, v_)
                for k_, v_ in want_seg.items()}

  # CI: one mesh and the causal methods (the full matrix takes minutes of
  # compilation on a shared 2-core machine).
  quick = bool(os.environ.get("CI"))
  specs = ("seq:%d" % ndev,) + (() if quick else
                                ("seq:2,data:%d" % (ndev // 2),))
  for spec in specs:
    mesh = sharding.make_mesh(spec)
    # The seq axis must cross processes: its first row of devices.
    row = np.moveaxis(mesh.devices, mesh.axis_names.index("seq"), -1)
    row = row.reshape(-1, mesh.shape["seq"])[0]
    if len({d.process_index for d in row}) < 2:
      raise AssertionError(f"mesh {spec}: seq axis within one process")
    bax = "data" if "data" in mesh.axis_names else None
    g = lambda x, seq=True: sharding.global_batch(
        x, mesh, data_axis=bax, seq_axis="seq" if seq else None)
    gq, gk, gv, gdo = g(q), g(k), g(v), g(do)
    gkb, gvb = g(k_bad), g(v_bad)
    gqs, gks = g(qseg, seq=False), g(kvseg, seq=False)
    ring = lambda causal, lay="zigzag", **kw: (
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, axis_name="seq",
                                       is_causal=causal, layout=lay,
                                       batch_axis=bax, **kw))
    uly = lambda causal, **kw: (
        lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, axis_name="seq",
                                          is_causal=causal, batch_axis=bax,
                                          **kw))
    fns = {"ring causal zigzag": ring(True), "ulysses causal": uly(True)}
    if bax is None and not quick:   # the whole matrix once
      fns.update({"ring full": ring(False),
                  "ring causal striped": ring(True, "striped"),
                  "ulysses full": uly(False)})
    got = sharding.fetch(_value_and_grads(fns, gq, gk, gv, gdo))
    for name, res in got.items():
      _compare(f"mp {name} [{spec}]", res,
               want["causal" if "causal" in name else "full"], 2e-5)
    # Packed sequences whose padded key/value slots hold NaN / Inf: equal to
    # the clean reference (where the padded slots' gradients are exactly 0).
    seg = dict(q_segment_ids=gqs, kv_segment_ids=gks)
    fns = {"ring segments causal": ring(True, **seg),
           "ulysses segments causal": uly(True, **seg)}
    got = sharding.fetch(_value_and_grads(fns, gq, gkb, gvb, gdo))
    for name, res in got.items():
      _compare(f"mp {name} nan-padded kv [{spec}]", res, want_seg["causal"],
               2e-5)
  ok(f"mp attention on {nproc} processes x {jax.local_device_count()} "
     "devices")


def main(argv):
  """argv: GROUP[,GROUP...] [DIR]: the groups run in order in this process
  (one interpreter start, one jax import and device set-up for all of them),
  stopping at the first failed check."""
  groups = argv[1].split(",")
  unknown = set(groups) - {"attention", "ckpt_save", "ckpt_restore",
                           "ring_window", "mp_attention", "mp_ckpt", "mp"}
  if unknown:
    raise SystemExit(f"unknown group(s) {sorted(unknown)}")
  workdir = argv[2] if len(argv) > 2 else None
  for group in groups:
    if group == "attention":
      check_attention()
    elif group == "ckpt_save":
      check_ckpt_save(workdir)
    elif group == "ckpt_restore":
      check_ckpt_restore(workdir)
    elif group == "ring_window":
      check_ring_window()
    elif group == "mp_attention":
      check_mp_attention()
    elif group == "mp_ckpt":
      from experiments import sharding as _sharding
      _sharding.maybe_initialize_distributed()
      check_ckpt_save(workdir)
    elif group == "mp":     # attention, then a collective FSDP checkpoint
      check_mp_attention()
      check_ckpt_save(workdir)


if __name__ == "__main__":
  main(sys.argv)
