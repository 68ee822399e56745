"""finetune-ablation: measure, don't guess, what fine-tuning a Keras image base really does."""

__version__ = "0.1.0"
