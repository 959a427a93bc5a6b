class InvalidInput(ValueError):
    """Bad request input: maps to Triton's INVALID_ARG; the message names the problem."""


class Unavailable(RuntimeError):
    """A model the request needs cannot serve it now (its stub died, it is unloaded or reloading): maps to
    Triton's UNAVAILABLE (HTTP 503, gRPC UNAVAILABLE); retrying later can succeed. The message names the model."""


# What Triton 2.51 says when a request meets a model whose Python stub is gone, or a model that is not loaded.
DEAD_STUB_MARKERS = ("is not healthy", "Stub process")
NOT_SERVING_MARKERS = DEAD_STUB_MARKERS + ("is not ready", "unknown model", "Failed to obtain the health mutex")
