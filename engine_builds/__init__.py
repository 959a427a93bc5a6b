"""Builds of the production (``trtllm`` profile) engines, from the build specs in ``engine_builds/specs/``.

* :mod:`engine_builds.graphs`, :mod:`engine_builds.onnx_export`: the embed and rerank models as ONNX graphs with
  the Triton contract's tensors and everything after the transformer inside the graph, checked against the
  reference engines;
* :mod:`engine_builds.trtexec`: the ``trtexec`` command lines of their TensorRT plans;
* :mod:`engine_builds.trtllm`: TensorRT-LLM checkpoint and ``trtllm-build`` command lines;
* :mod:`engine_builds.tokenizer_info`: the xgrammar tokenizer info the ``tensorrtllm`` backend reads;
* :mod:`engine_builds.repository`: the trtllm model repository's version folders and the container paths;
* :mod:`engine_builds.build`: the command line, which writes a ``manifest.json`` (:mod:`ragstack.governance.manifest`) with
  every step.

Command lines are produced first and only then printed (``--dry-run``) or run, so the exact commands are
testable on a machine without TensorRT. ``docs/gpu-deployment.md`` walks through a deployment.
"""
