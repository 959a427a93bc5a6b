"""Model lifecycle inside Triton: load/unload engines under a memory budget, canary rollouts, self-healing.

* :mod:`~ragstack.lifecycle.manager`: :class:`ModelManager`, the pure policy core (budget, LRU, cooldown,
  leases, sequential pre-warm, self-healing, canary rollout).
* :mod:`~ragstack.lifecycle.canary`, :mod:`~ragstack.lifecycle.history`, :mod:`~ragstack.lifecycle.budget`.
* :mod:`~ragstack.lifecycle.service`: the op protocol of the ``model_manager`` Triton model.
* :mod:`~ragstack.lifecycle.bls_client`: ``engine_lease(pb, model)`` for BLS models;
  :mod:`~ragstack.lifecycle.client`: the same over HTTP.
* :mod:`~ragstack.lifecycle.triton_io` (Triton side, ``pb`` passed in), :mod:`~ragstack.lifecycle.procmem`.

The package imports none of them: a BLS model that only takes leases (``bls_client``) does not load the manager.
"""
