"""The Hugging Face remote-code files `dcp-to-hf` copies next to the weights (trust_remote_code).

configuration_fusion.py and modeling_fusion.py import nothing from fusion_titan: they are a
self-contained plain-torch port of the inference forward pass, so people without this package
can load an export with `transformers.AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. tests/test_hf_export.py checks its logits against our model.
"""
