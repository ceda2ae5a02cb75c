"""Checkpoint guards (manager), step-folder inspection (folders), Hugging Face names and
config.json (state_dict_adapter), and offline conversions (convert). See docs/checkpointing.md."""
