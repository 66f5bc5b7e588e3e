"""The inference engine: an ONNX decoder on onnxruntime, tokenized with tokenizers.

Owned by whichever thread calls it (the daemon's worker); an ``Engine`` is not
shared between threads. Its modules: ``engine`` (the model, its session, and
``generate``: a one-slot run of the scheduler), ``batch`` (the scheduler: one
loop for one or many sequences), ``sequence`` (a request's per-token rules and
completion), ``rows`` (decode passes over cache slots; how the CPU rounds one
row vs many), ``kv_cache``, ``prefill`` + ``prefix_cache`` + ``prefix_store``
(chunk plans, the token-exact prefix cache), ``speculate`` (prompt-lookup
speculative decoding), ``sampling``, ``tokenizer``, ``text_stream`` (UTF-8-safe
streaming, stop strings), ``model_folder`` (genai_config.json), ``onnx_graph``
and ``weight_traffic`` (bytes read per token), ``memory_plan`` (the expected peak
and the budgets that fit a box).  See docs/engine.md.
"""
