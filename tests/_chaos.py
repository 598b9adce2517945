"""Fault injection for the Ray tests, outside the production code: a ClientActor subclass that
crashes, corrupts its update or kills the LLM trainer on chosen (round, client) fits.

``app.train(cfg, run_dir, client_class=chaos_client(cfg, {(0, 1): "die"}))``. The class is made
inside a function, so Ray ships it by value to its workers (tests/ is not on their path). A fit is
recognised by its seed, which the coordinator derives from (federation.seed, round, client).
"""

from __future__ import annotations

import os

FAULTS = ("die", "nan", "scale", "kill_trainer", "die_after_mask")


def chaos_client(cfg, faults: dict[tuple[int, int], str]) -> type:
    """A ClientActor whose fit of client ``c`` in round ``r`` does ``faults[(r, c)]``:

    ``die`` kills the process mid-round; ``nan`` uploads a NaN tensor; ``scale``
    uploads the trained state times 1000 (a model-replacement attack); ``kill_trainer`` kills the
    LLM trainer actor with this client's second split step (and whatever others have) in flight;
    ``die_after_mask`` (SecAgg) uploads its masked input, then dies when asked to unmask.
    """
    import torch

    from fednano_ray.actors.client import ClientActor, RemoteServer
    from fednano_ray.federation.rounds import round_seed

    unknown = set(faults.values()) - set(FAULTS)
    assert not unknown, f"unknown faults {unknown}; known: {FAULTS}"
    by_seed = {
        round_seed(cfg.federation.seed, r, c): (c, fault) for (r, c), fault in faults.items()
    }

    class KillingServer(RemoteServer):
        """Kills the trainer actor while the split step ``kill_in`` calls from now is in flight."""

        def __init__(self, handle, kill_in: int) -> None:
            super().__init__(handle)
            self.kill_in = kill_in

        def _step(self, method, *args):
            import ray

            ref = method.remote(*args)
            if self.kill_in == 0:
                ray.kill(
                    self.handle, no_restart=False
                )  # SIGKILL; Ray restarts it (max_restarts=-1)
            self.kill_in -= 1
            return ray.get(ref)

    class ChaosClient(ClientActor):
        doomed: set[tuple[int, int]]

        def fit(self, client_id, indices, start_state, **kwargs):
            c, fault = by_seed.get(kwargs.get("seed"), (None, None))
            fault = fault if c == client_id else None
            if fault == "die":
                os._exit(1)  # a real crash: the process disappears mid-round
            if fault == "kill_trainer":
                server, steps = self.server, kwargs["steps"]
                self.server = KillingServer(server.handle, 1 if steps > 1 else 0)
                try:
                    return super().fit(client_id, indices, start_state, **kwargs)
                finally:
                    self.server = server
            out = super().fit(client_id, indices, start_state, **kwargs)
            if fault == "nan":  # a diverged or corrupted upload: the coordinator must reject it
                first = next(iter(out["state"]))
                out["state"][first] = torch.full_like(out["state"][first], float("nan"))
            if fault == "scale":
                out["state"] = {k: v * 1000.0 for k, v in out["state"].items()}
            if fault == "die_after_mask":
                if not hasattr(self, "doomed"):
                    self.doomed = set()
                self.doomed.add((kwargs["secagg"]["round"], client_id))
            return out

        def secagg_unmask(self, rnd, client_id, survivors, dropped):
            if (rnd, client_id) in getattr(self, "doomed", ()):
                os._exit(1)  # gone after uploading its masked input, before unmasking
            return super().secagg_unmask(rnd, client_id, survivors, dropped)

    return ChaosClient


def failing_transport(cfg, fail: set[tuple[int, int]]):
    """An in-process transport (fednano_ray.federation.transport.InProcess) on which client ``c``'s
    fit of round ``r`` crashes for every ``(r, c)`` in ``fail``, as a died actor's call would."""
    from fednano_ray.federation.rounds import round_seed
    from fednano_ray.federation.transport import InProcess

    seeds = {round_seed(cfg.federation.seed, r, c): c for r, c in fail}

    class Failing(InProcess):
        def submit(self, actor, method, *args, **kwargs):
            if method == "fit" and seeds.get(kwargs.get("seed")) == args[0]:
                return super().submit(self, "_crash", method, args[0])
            return super().submit(actor, method, *args, **kwargs)

        @staticmethod
        def _crash(method, client):
            raise RuntimeError(f"injected: {method} of client {client} crashed")

    return Failing()
