"""Vision transformers for image classification: pretrained (hub id or local folder) or built from a config.

The backbone mapping is the Hydra ``backbone`` node of the image family (``conf/backbone/vit_*.yaml``):
``pretrained`` (hub id or ``save_pretrained`` folder; null builds ``from_config``), ``config`` (overrides),
``dtype``, ``image_size`` (config-built models), ``processor`` (``ViTImageProcessor`` keyword arguments),
``target_modules`` and ``head_modules``. Images are processed by the PIL/NumPy image-processor backend, so
neither torchvision nor a GPU is needed to feed the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from flexlora.backbones.hub import resolve_pretrained
from flexlora.errors import FlexLoRAError
from flexlora.schemas import BackboneConfig, backbone_config

try:  # transformers >= 5: the PIL backend has its own class; ViTImageProcessor needs torchvision there
    from transformers import ViTImageProcessorPil as _ViTProcessor

    _PIL_BACKEND: dict[str, Any] = {"backend": "pil"}
except ImportError:  # transformers 4: ViTImageProcessor is the slow (NumPy) processor
    from transformers import ViTImageProcessor as _ViTProcessor

    _PIL_BACKEND = {"use_fast": False}

# ViT linear maps per block, as full-match regexes (peft's rule for a string target). transformers 5 names a
# block vit.layers.N.{attention.{q,k,v,o}_proj, mlp.fc1, mlp.fc2}; transformers 4 named it
# vit.encoder.layer.N.{attention.attention.{query,key,value}, attention.output.dense, intermediate.dense,
# output.dense}. Each preset matches both; "mlp" must not match the attention output projection.
VIT_TARGET_PRESETS: dict[str, str] = {
    "mlp": r".*\.layers?\.\d+\.(mlp\.fc1|mlp\.fc2|intermediate\.dense|output\.dense)",
    "attn": r".*\.layers?\.\d+\.attention\.(q_proj|k_proj|v_proj|attention\.query|attention\.key|attention\.value)",
}

# keyword arguments of the PIL ViT image processor that a backbone config may set
PROCESSOR_KEYS = frozenset({
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "do_center_crop", "crop_size",
})


def vit_target_modules(preset: str) -> str:
    """The target-module regex of a preset name (``mlp`` = fc1 + fc2, ``attn`` = query, key, value)."""
    try:
        return VIT_TARGET_PRESETS[preset]
    except KeyError:
        raise FlexLoRAError(
            f"unknown ViT target preset {preset!r}; choose backbone.target_preset from {sorted(VIT_TARGET_PRESETS)}"
        ) from None


def _plain(value: Any) -> Any:
    """Hydra nodes (DictConfig / ListConfig) to plain dicts and lists, which transformers expects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def _processor_kwargs(backbone: BackboneConfig) -> dict[str, Any]:
    kwargs = _plain(backbone.processor or {})
    unknown = sorted(set(kwargs) - PROCESSOR_KEYS)
    if unknown:
        raise FlexLoRAError(
            f"backbone.processor has unknown keys {unknown}; allowed ViTImageProcessor keys: {sorted(PROCESSOR_KEYS)}"
        )
    if isinstance(kwargs.get("size"), int):
        kwargs["size"] = {"height": kwargs["size"], "width": kwargs["size"]}
    image_size = backbone.image_size
    if image_size and not backbone.pretrained:
        size = kwargs.setdefault("size", {"height": int(image_size), "width": int(image_size)})
        if (size.get("height"), size.get("width")) != (image_size, image_size):
            raise FlexLoRAError(
                f"backbone.processor.size {size} does not match backbone.image_size={image_size}; the model only "
                "accepts images of its own size, so make them equal"
            )
    return kwargs


def load_image_processor(backbone: Mapping[str, Any] | BackboneConfig) -> Any:
    """The image processor (PIL/NumPy backend): ``backbone.processor`` kwargs, over the pretrained one if any.

    With ``pretrained`` set, the checkpoint's processor is loaded and ``processor`` (if given) overrides its
    fields, e.g. ``{resample: 3, image_mean: [0.485, 0.456, 0.406], image_std: [0.229, 0.224, 0.225]}``
    to reproduce NOAH's bicubic resize and ImageNet normalisation.
    """
    backbone = backbone_config(backbone)
    kwargs = _processor_kwargs(backbone)
    if backbone.pretrained:
        path = resolve_pretrained(str(backbone.pretrained))
        return AutoImageProcessor.from_pretrained(path, **_PIL_BACKEND, **kwargs)
    if not kwargs:
        raise FlexLoRAError(
            "backbone.processor is required when backbone.pretrained is null: set its size, image_mean and "
            "image_std, e.g. {size: {height: 32, width: 32}, image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5]}"
        )
    return _ViTProcessor(**kwargs)


def load_image_classifier(backbone: Mapping[str, Any] | BackboneConfig, num_labels: int) -> nn.Module:
    """An ``AutoModelForImageClassification`` (a ViT, new random head of ``num_labels``) in training mode."""
    backbone = backbone_config(backbone)
    if num_labels < 2:
        raise FlexLoRAError(f"an image classifier needs num_labels >= 2, got {num_labels}; check the task's labels")
    overrides = _plain(backbone.config or {})
    image_size = backbone.image_size
    labels = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if backbone.pretrained:
        path = resolve_pretrained(str(backbone.pretrained))
        config = AutoConfig.from_pretrained(path, **overrides)
        # set after loading: passing num_labels to from_pretrained warns when the checkpoint has an id2label map
        config.num_labels, config.problem_type = num_labels, labels["problem_type"]
        if image_size and config.image_size != image_size:
            raise FlexLoRAError(
                f"backbone.image_size={image_size} but the checkpoint {backbone.pretrained} was trained at "
                f"{config.image_size}; set backbone.image_size to null (the checkpoint's size)"
            )
        # the checkpoint's head (if any) has another label count: a new head is the point, not a mistake
        model = AutoModelForImageClassification.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    else:
        spec = _plain(backbone.from_config or {})
        if "model_type" not in spec:
            raise FlexLoRAError(
                "backbone.from_config needs a model_type (e.g. vit) when backbone.pretrained is null"
            )
        model_type = spec.pop("model_type")
        if image_size:
            if spec.get("image_size", image_size) != image_size:
                raise FlexLoRAError(
                    f"backbone.image_size={image_size} and backbone.from_config.image_size={spec['image_size']} "
                    "differ; set only backbone.image_size"
                )
            spec["image_size"] = image_size
        config = AutoConfig.for_model(model_type, **labels, **{**spec, **overrides})
        try:
            model = AutoModelForImageClassification.from_config(config)
        except ValueError as err:
            raise FlexLoRAError(
                f"backbone.from_config.model_type={model_type!r} has no image-classification model in transformers "
                f"({err}); use model_type: vit"
            ) from err
    dtype = backbone.dtype
    if dtype:
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise FlexLoRAError(f"backbone.dtype={dtype!r} is not a torch dtype; use null, float32 or bfloat16")
        model = model.to(getattr(torch, str(dtype)))
    # transformers 5 returns from_pretrained models in eval mode; training code must not inherit that silently.
    model.train()
    return model
