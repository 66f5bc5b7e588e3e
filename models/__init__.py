"""Model tooling for edge-agent.

Builds ONNX model folders (``genai_config.json``, ``model.onnx``, tokenizer files)
with the onnxruntime-genai model builder:

* :mod:`models.builder` -- shared wrapper around the builder (run it, check output).
* :mod:`models.tokenizer` -- byte-level BPE tokenizer training and chat template.
* :mod:`models.fixtures` -- tiny random-weight test fixtures for five families.
* :mod:`models.convert` -- convert a local Hugging Face checkpoint folder.
* :mod:`models.demo` -- train and export the small quickstart demo model.
* :mod:`models.copy_task` -- train and export a small model that copies spans of its prompt.
* :mod:`models.edge_cost` -- pad a small trained model to Phi-3-mini's layer shapes, same function.
"""
