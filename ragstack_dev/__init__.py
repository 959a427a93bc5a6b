"""Development and test tooling kept out of the runtime ``ragstack`` package (the image copies only ``ragstack/``):
the tritonserver test launcher (server.py), model-set builders, retrieval evaluation, soak and scale-out drivers."""
