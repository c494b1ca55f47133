"""Meshes and sharding rules."""
from rmjax.parallel.mesh import (BATCH_AXES, MESH_AXES, RULES, batch_sharding, global_batch, make_mesh,
                                 mesh_from_config, replicated, spec_for, tree_shardings)
