"""The federated run without Ray: what a method is (:mod:`.method`) and the run directory
(:mod:`.rundir`). Nothing here imports Ray; the actors in :mod:`fednano_ray.actors` place and
transport what this package decides."""
