"""Meshes, sharding rules and multi-process set-up."""
from rmjax.parallel.distributed import ProcessGroup, initialize_from_env, process_group
from rmjax.parallel.mesh import (BATCH_AXES, KV_CACHE_AXES, MESH_AXES, RULES, MeshAxes, batch_sharding, global_batch,
                                 kv_cache_shardings, make_mesh, mesh_from_config, replicated, spec_for,
                                 tree_shardings)
