"""The precision policy under emulated TF32: what a GPU does to every float32 dot left unpinned.

On Ampere/Hopper GPUs XLA runs a float32 dot_general or convolution whose precision is not
HIGHEST with TF32 operands (10 mantissa bits). `emulate_tf32` reproduces that on CPU: it
interprets a function's jaxpr and rounds both float32 operands of every such op to TF32 (round to
nearest even), everything else bit for bit. Under the default policy ("highest") the backbones,
adaptors and scorer must be unaffected; under "tf32" they must move, which shows the emulation
reaches those layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lsfa_jax import precision as precision_policy
from lsfa_jax.features.point_mae_grid import point_mae_patch_grid_batch
from lsfa_jax.models import point_mae, vit
from lsfa_jax.models.adaptors import apply_adaptors, init_lsfa_params, lsfa_model
from lsfa_jax.patchcore.bank import build_memory_bank
from lsfa_jax.patchcore.scorer import score_batch

ROUNDED_OPS = ("dot_general", "conv_general_dilated")
# Call-like primitives whose body is interpreted in place (no differentiation here).
INLINED = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call")
INLINED += ("custom_vjp_call", "custom_vjp_call_jaxpr")


def round_to_tf32(x: jax.Array) -> jax.Array:
    """float32 -> float32 with 10 mantissa bits (round to nearest, ties to even)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def _pinned(params: dict) -> bool:
    given = params.get("precision")
    values = given if isinstance(given, tuple) else (given,)
    return all(v == jax.lax.Precision.HIGHEST for v in values)


class _Emulator:
    """Evaluates jaxprs with TF32 operands for unpinned float32 dots; counts the dots rounded."""

    def __init__(self) -> None:
        self.rounded: list[str] = []

    def closed(self, closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
        """The same computation with the emulation inside (for loop and branch bodies)."""
        n_consts = len(closed.consts)

        def body(*args):
            return self.run(closed.jaxpr, args[:n_consts], *args[n_consts:])

        avals = [jax.typeof(c) for c in closed.consts] + list(closed.in_avals)
        traced = jax.make_jaxpr(body)(*avals)
        assert not traced.consts and not n_consts, "bodies with constants are not handled"
        return traced

    def run(self, jaxpr: jcore.Jaxpr, consts, *args):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in INLINED:
                inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                if isinstance(inner, jcore.ClosedJaxpr):
                    outvals = self.run(inner.jaxpr, inner.consts, *invals)
                else:
                    outvals = self.run(inner, (), *invals)
            else:
                params = dict(eqn.params)
                if name in ROUNDED_OPS and not _pinned(params):
                    if any(x.dtype == jnp.float32 for x in invals[:2]):
                        self.rounded.append(f"{name} {[tuple(x.shape) for x in invals[:2]]}")
                    invals = [
                        round_to_tf32(x) if i < 2 and x.dtype == jnp.float32 else x
                        for i, x in enumerate(invals)
                    ]
                for key, value in params.items():
                    if isinstance(value, jcore.ClosedJaxpr):
                        params[key] = self.closed(value)
                    elif (
                        isinstance(value, tuple)
                        and value
                        and isinstance(value[0], jcore.ClosedJaxpr)
                    ):
                        params[key] = tuple(self.closed(v) for v in value)
                outvals = eqn.primitive.bind(*invals, **params)
                if not eqn.primitive.multiple_results:
                    outvals = [outvals]
            for var, value in zip(eqn.outvars, outvals, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]


def emulate_tf32(fn: Callable, *args) -> tuple[list[np.ndarray], list[str]]:
    """Outputs of fn(*args) with TF32 emulation (as numpy) and the unpinned float32 dots."""
    closed = jax.make_jaxpr(fn)(*args)
    emulator = _Emulator()
    # The emulating interpreter is traced once more under jit, so XLA runs it compiled.
    flat = jax.tree.leaves(args)
    outs = jax.jit(lambda *a: emulator.run(closed.jaxpr, closed.consts, *a))(*flat)
    return [np.asarray(o, np.float32) for o in outs], emulator.rounded


def reference(fn: Callable, *args) -> list[np.ndarray]:
    return [np.asarray(o, np.float32) for o in jax.tree.leaves(jax.jit(fn)(*args))]


def max_deviation(fn: Callable, *args) -> tuple[float, list[str]]:
    want = reference(fn, *args)
    got, rounded = emulate_tf32(fn, *args)
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True)), rounded


@pytest.mark.slow
def test_emulation_rounds_unpinned_float32_dots_only() -> None:
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(16, 64)), jnp.float32) for _ in range(2))
    pinned = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    deviation, rounded = max_deviation(lambda x, y: jnp.matmul(x, y.T), a, b)
    want = np.asarray(round_to_tf32(a), np.float64) @ np.asarray(round_to_tf32(b), np.float64).T
    got, _ = emulate_tf32(lambda x, y: jnp.matmul(x, y.T), a, b)
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    assert deviation > 1e-3 and len(rounded) == 1
    assert max_deviation(lambda x, y: pinned(x, y.T), a, b) == (0.0, [])
    # bfloat16 operands are not float32: left alone (the certified kNN screen).
    bf16 = lambda x, y: jnp.matmul(
        x.astype(jnp.bfloat16), y.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )
    assert max_deviation(bf16, a, b) == (0.0, [])
    # Inside loops, jitted calls and custom derivatives (softmax) too.
    looped = lambda x, y: jax.lax.map(lambda r: jax.nn.softmax(jax.jit(jnp.matmul)(y, r)), x)
    deviation, rounded = max_deviation(looped, a, b)
    assert deviation > 0 and len(rounded) == 1
    # The rounding itself: 10 explicit mantissa bits, ties to even.
    x = jnp.asarray([1 + 2**-10, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20], jnp.float32)
    assert np.asarray(round_to_tf32(x)).tolist() == [1 + 2**-10, 1.0, 1 + 2**-9, 1 + 2**-10]


VIT = vit.ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
POINT = dict(
    num_group=16, group_size=16, trans_dim=48, depth=1, num_heads=4, mlp_ratio=2, out_layers=(0,)
)


def _images(size: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)


def _clouds() -> np.ndarray:
    v, u = np.mgrid[:32, :32] / 32
    z = 0.6 + 0.02 * np.sin(7 * u) * np.cos(5 * v)
    cloud = np.stack([u * 0.1 - 0.05, v * 0.1 - 0.05, z], axis=-1).astype(np.float32)
    cloud[:6, :9] = 0.0
    return np.stack([cloud, cloud[::-1] * np.float32(1.01)])


def _vit_grid(policy: str, size: int):
    params = vit.init_random_vit_params(jax.random.key(0), VIT)
    return lambda images: vit.dino_patch_grid(
        params, images, model_cfg=VIT, return_cls=True, precision=policy
    ), _images(size)


def _point_grid(policy: str):
    cfg = ml_collections.ConfigDict(POINT)
    variables = point_mae.init_random_point_mae_variables(jax.random.key(2), cfg)
    clouds = _clouds()
    encoder = point_mae.point_mae_encoder(cfg, policy)
    # The jitted body of point_mae_patch_grid_batch (host checks run once, outside the trace).
    point_mae_patch_grid_batch(variables, clouds, cfg, grid_size=8, precision=policy)
    from lsfa_jax.features.point_mae_grid import _compiled

    body = _compiled(encoder, 8, True)
    return lambda c: body(variables, c), jnp.asarray(clouds)


@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 48])  # 48: the position embedding is resized
def test_vit_is_unaffected_by_tf32_under_the_default_policy(size: int) -> None:
    fn, images = _vit_grid("highest", size)
    deviation, rounded = max_deviation(fn, images)
    assert deviation <= 1e-4, (deviation, rounded)
    assert rounded == []
    fn, images = _vit_grid("tf32", size)
    deviation, rounded = max_deviation(fn, images)
    # patch conv, qkv, 2 attention einsums, proj, fc1, fc2 per block
    assert len(rounded) == 1 + 6 * VIT.depth and deviation > 1e-4, (deviation, rounded)


@pytest.mark.slow
def test_point_mae_is_unaffected_by_tf32_under_the_default_policy() -> None:
    fn, clouds = _point_grid("highest")
    deviation, rounded = max_deviation(fn, clouds)
    assert deviation <= 1e-4, (deviation, rounded)
    assert rounded == []
    fn, clouds = _point_grid("tf32")
    deviation, rounded = max_deviation(fn, clouds)
    # 4 MiniPointNet layers, 2 pos_embed layers, then qkv, 2 einsums, proj, fc1, fc2 per block
    assert len(rounded) == 6 + 6 * POINT["depth"] and deviation > 1e-4, (deviation, rounded)


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["encoder1", "linear", "conv1x1"])
def test_adaptors_are_unaffected_by_tf32_under_the_default_policy(structure: str) -> None:
    fields = dict(rgb_dim=32, xyz_dim=48, proj_dim=8, structure=structure, rgb_heads=4)
    params = init_lsfa_params(lsfa_model(**fields, xyz_heads=4), jax.random.key(3), 16)
    rng = np.random.default_rng(4)
    rgb = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    xyz = jnp.asarray(rng.normal(size=(2, 16, 48)), jnp.float32)
    deviations = {}
    for policy in ("highest", "tf32"):
        fn = functools.partial(
            apply_adaptors, structure=structure, rgb_heads=4, xyz_heads=4, precision=policy
        )
        deviations[policy] = max_deviation(fn, params, rgb, xyz)
    assert deviations["highest"] == (0.0, [])
    assert deviations["tf32"][0] > 1e-4 and deviations["tf32"][1]


@pytest.mark.slow
@pytest.mark.parametrize("search", ["screened", "exact", "approximate"])
def test_scorer_is_pinned_whatever_the_policy(search: str) -> None:
    """Bank search, reweighting and anomaly maps: no float32 dot is left to the device."""
    rng = np.random.default_rng(5)
    library = rng.normal(size=(600, 24)).astype(np.float32)
    bank = build_memory_bank(library, ratio=0.5, key=jax.random.key(6), padded_size=320)
    queries = jnp.asarray(rng.normal(size=(2, 16, 24)), jnp.float32)
    fn = functools.partial(
        score_batch, out_size=16, bank_chunk=32, search=search, approximate_dim=8
    )
    assert max_deviation(lambda q: fn(bank, q), queries) == (0.0, [])


def test_unknown_policy_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"config.precision='fp16'.*highest"):
        precision_policy.policy("fp16")
