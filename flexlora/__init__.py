"""flexlora: FlexLoRA, AdaLoRA and LoRA on Hugging Face backbones, trained with Lightning, composed with Hydra."""

__version__ = "0.1.0"
