"""fusion_titan: a hybrid MLA + Gated DeltaNet + DeepSeekMoE pre-training recipe on torchtitan.

Importing the package is cheap; `fusion_titan.spec` registers the "fusion" TrainSpec with
torchtitan (it is what `[experimental] custom_import` names).
"""

__version__ = "0.1.0"
