"""Tensor contracts and wire formats: the engines' tensors (tensors.py), the generated model configs
(model_config.py), TensorRT-LLM's request/response tensors (trtllm.py), the clients' JSON and tensors (client.py),
JSON request parsing (json_input.py) and the request errors (errors.py). Plain Python and numpy: nothing here imports
Triton."""
