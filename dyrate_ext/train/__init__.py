"""Training: the tiny LLaVA (`python -m dyrate_ext.train vlm`) and DyRate's rate predictor
(`python -m dyrate_ext.train predictor`).

    from dyrate_ext.train.model import load_tiny_llava, TinyConfig
    from dyrate_ext.train.vlm import TrainConfig, train_vlm

Submodules import transformers; importing this package alone does not.
"""
