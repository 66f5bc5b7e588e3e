"""The inference engine: an ONNX decoder on onnxruntime, tokenized with tokenizers.

Owned by whichever thread calls it (the daemon's worker); an ``Engine`` is not
shared between threads. Its modules: ``engine`` (prefill and decode loop),
``kv_cache``, ``speculate`` (prompt-lookup speculative decoding), ``batch``
(continuous batching), ``sampling``, ``tokenizer``, ``text_stream`` (UTF-8-safe
streaming, stop strings), ``model_folder`` (genai_config.json),
``onnx_graph`` and ``weight_traffic`` (bytes read per token), ``memory_plan`` (the
expected peak and the budgets that fit a box).
"""
