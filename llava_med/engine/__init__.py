"""Generation engines: one engine serves every concurrent request of a model worker.

``base`` holds the interface (:class:`~llava_med.engine.base.Engine`, :class:`~llava_med.engine.base.EngineRequest`,
the output record), ``registry`` maps ``--engine`` names to engine classes. Backends: ``hf`` (transformers,
continuous batching; the default), ``vllm`` (vLLM's engine over a converted checkpoint) and ``fake`` (scripted
text, for tests and demos).
"""
