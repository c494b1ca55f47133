"""Logical-axis rules on an abstract 2 x 4 x 2 mesh (no devices needed)."""
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from rmjax import parallel
from rmjax.models import partitioning, transformer
from rmjax.models.config import get_size

MESH = AbstractMesh((2, 4, 2), parallel.MESH_AXES)


@pytest.mark.parametrize('shape,names,spec', [
    ((512, 64), ('vocab', 'embed'), P('tensor', 'fsdp')),        # token table: Megatron vocab split + FSDP
    ((64, 128), ('embed', 'qkv'), P('fsdp', 'tensor')),
    ((64, 64), ('heads', 'embed'), P('tensor', 'fsdp')),
    ((2, 64, 344), ('ensemble', 'embed', 'mlp'), P(None, 'fsdp', 'tensor')),
    ((64,), ('norm',), P(None)),
    ((16, 32), ('batch', None), P(('data', 'fsdp'), None)),
    ((2, 32), ('batch', None), P('data', None)),                 # 4 does not divide the rest: data only
    ((3, 343), ('batch', 'mlp'), P(None, None)),                 # nothing divides: replicated
    ((64, 64), ('embed', 'embed'), P('fsdp', None)),             # an axis is used once per array
    ((4, 64, 128), ('layers', 'embed', 'qkv'), P(None, 'fsdp', 'tensor')),  # scanned layers: replicated axis
    ((2, 4, 64), ('ensemble', 'layers', 'norm'), P(None, None, None)),
])
def test_spec_for(shape, names, spec):
  assert parallel.spec_for(shape, names, MESH) == spec


def test_scanned_lm_params_keep_the_layer_axis_whole():
  config = get_size('tiny').replace(scan_layers=True)
  shapes = jax.eval_shape(lambda k: transformer.init_lm(k, config), jax.random.key(0))
  axes = partitioning.logical_axes(shapes)
  specs = jax.tree.map(lambda x, a: parallel.spec_for(x.shape, a, MESH), shapes, axes,
                       is_leaf=lambda x: isinstance(x, tuple))
  layers = specs['backbone']['layers']
  assert layers['mlp']['gate_up']['kernel'] == P(None, 'fsdp', 'tensor')
  assert layers['attn']['out']['kernel'] == P(None, 'tensor', 'fsdp')
  assert layers['attn_norm']['scale'] == P(None, None)


def test_unknown_logical_name_raises():
  with pytest.raises(ValueError, match="no sharding rule for the logical axis 'heads_typo'"):
    parallel.spec_for((4,), ('heads_typo',), MESH)


def test_kv_cache_rows_over_batch_axes_and_kv_heads_over_tensor():
  cache = jax.eval_shape(lambda: transformer.init_cache(get_size('tiny'), 16, 40))
  sh = parallel.kv_cache_shardings(cache, MESH)
  assert all(s.spec == P(('data', 'fsdp'), 'tensor', None, None) for s in sh.k + sh.v)
  assert sh.valid.spec == P(('data', 'fsdp'), None) and sh.index.spec == P()


@pytest.mark.parametrize('sizes,shape', [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 4, 2), (1, 4, 2))])
def test_make_mesh_sizes(sizes, shape):
  # One CPU device listed 8 times: only the count matters to the size arithmetic.
  assert tuple(parallel.make_mesh(*sizes, devices=jax.devices() * 8).shape.values()) == shape


def test_make_mesh_misfit_names_the_fix():
  with pytest.raises(ValueError, match='product is 8'):
    parallel.make_mesh(3, 1, 1, devices=jax.devices() * 8)
  with pytest.raises(ValueError, match='at most one of data, fsdp, tensor may be -1'):
    parallel.make_mesh(-1, -1, 1, devices=jax.devices() * 8)
