"""A documented compatibility shim for kfac-jax 0.0.8 on jax >= 0.9.2.

kfac-jax 0.0.8 crashes at its first curvature update on jax >= 0.9.2: its
``tag_graph_matcher.eval_jaxpr_eqn`` unpacks ``Primitive.get_bind_params`` as a
``(subfuns, params)`` tuple, but it now returns a dict of params. ``apply()``
replaces that one function with a version that accepts both, and only when the
installed jax needs it. Nothing else of kfac-jax is touched.
"""

from __future__ import annotations


def _needs_shim() -> bool:
  import jax
  eqn = jax.make_jaxpr(lambda x: x + 1.0)(1.0).jaxpr.eqns[0]
  return not isinstance(eqn.primitive.get_bind_params(eqn.params), tuple)


def apply() -> bool:
  """Patches kfac-jax if needed; returns whether the shim was applied."""
  from kfac_jax._src import tag_graph_matcher as tgm
  if not _needs_shim():
    return False
  from jax.extend import source_info_util

  def eval_jaxpr_eqn(eqn, in_values):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(bind_params, tuple):
      subfuns, bind_params = bind_params
    with source_info_util.user_context(eqn.source_info.traceback):
      output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
    return output if isinstance(output, list) else (
        list(output) if eqn.primitive.multiple_results else [output])

  tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
  return True
