"""VTAB-1k lists, image dataset and ViT backbones: error messages, the real fashion_mnist folder, presets."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoConfig, AutoModelForImageClassification

from flexlora.adapters import inject, matches
from flexlora.backbones.vision import (
    VIT_TARGET_PRESETS,
    load_image_classifier,
    load_image_processor,
    vit_target_modules,
)
from flexlora.data.vtab import (
    GROUPS,
    VTAB_TASKS,
    VTABEntry,
    VTABImageDataset,
    collate_images,
    load_vtab_splits,
    read_list,
    vtab_task,
)
from flexlora.errors import FlexLoRAError
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
BACKBONES = REPO / "conf" / "backbone"


FASHION = shared_data("vtab-1k", "fashion_mnist") or Path("/nonexistent")
needs_fashion = pytest.mark.skipif(not (FASHION / "test.txt").is_file(), reason="vtab-1k/fashion_mnist not found")


def _backbone(name: str, *overrides: str):
    cfg = OmegaConf.load(BACKBONES / f"{name}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))) if overrides else cfg


def _task_folder(root: Path, lists: dict[str, str], images: dict[str, bytes | None] | None = None) -> Path:
    """A small task folder: list files with the given text, images as given (None: a real 4x4 PNG)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in lists.items():
        (root / name).write_text(text)
    for rel, data in (images or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            Image.fromarray(np.full((4, 4), 128, dtype=np.uint8)).save(path)
        else:
            path.write_bytes(data)
    return root


def _good_folder(root: Path) -> Path:
    lists = {"train800.txt": "images/a.png 0\n", "val200.txt": "images/b.png 1\n",
             "train800val200.txt": "images/a.png 0\nimages/b.png 1\n", "test.txt": "images/c.png 2\n"}
    return _task_folder(root, lists, {"images/a.png": None, "images/b.png": None, "images/c.png": None})


# ---------------------------------------------------------------- task table


def test_task_table_has_the_19_tasks_in_paper_order():
    assert len(VTAB_TASKS) == 19
    assert list(VTAB_TASKS)[:7] == ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                                    "sun397"]
    groups = [t.group for t in VTAB_TASKS.values()]
    assert groups == ["Natural"] * 7 + ["Specialized"] * 4 + ["Structured"] * 8
    assert set(groups) == set(GROUPS)
    assert [t.display for t in VTAB_TASKS.values()][-8:] == [
        "Clevr-Count", "Clevr-Dist", "DMLab", "KITTI-Dist", "dSpr-Loc", "dSpr-Ori", "sNORB-Azim", "sNORB-Elev"]
    assert vtab_task("cifar").num_classes == 100 and vtab_task("sun397").num_classes == 397
    with pytest.raises(FlexLoRAError, match=r"unknown VTAB-1k task 'cifar100'; the 19 task folders are: cifar, "):
        vtab_task("cifar100")


# ---------------------------------------------------------------- list-file errors


def test_missing_list_names_the_files_the_folder_has(tmp_path):
    folder = _task_folder(tmp_path / "t", {"train800.txt": "images/a.png 0\n", "test.txt": "images/a.png 0\n"})
    with pytest.raises(FlexLoRAError) as err:
        load_vtab_splits(folder, "tune")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{folder / 'val200.txt'} not found" in msg and "has test.txt, train800.txt" in msg
    with pytest.raises(FlexLoRAError, match=r"has test\.txt, train800\.txt"):
        read_list(folder / "train800val200.txt")
    with pytest.raises(FlexLoRAError, match=r"folder .*nowhere does not exist"):
        read_list(tmp_path / "nowhere" / "test.txt")
    with pytest.raises(FlexLoRAError, match=r"task folder .*nowhere does not exist"):
        load_vtab_splits(tmp_path / "nowhere")


@pytest.mark.parametrize(("text", "line", "expected"), [
    ("images/a.png 0\nimages/b.png\n", 2, r"expected '<relative image path> <integer label>', got 'images/b.png' "
                                          r"\(no label\)"),
    ("images/a.png 0\n\nimages/b.png cat\n", 3, r"label 'cat' is not an integer"),
    ("images/a.png 1.0\n", 1, r"label '1\.0' is not an integer"),
    ("images/a.png -1\n", 1, r"label -1 is negative"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, expected):
    path = tmp_path / "test.txt"
    path.write_text(text)
    with pytest.raises(FlexLoRAError, match=re.escape(f"{path}:{line}: ") + expected) as err:
        read_list(path)
    assert "\n" not in str(err.value)


def test_empty_list(tmp_path):
    path = tmp_path / "val200.txt"
    path.write_text("\n\n")
    with pytest.raises(FlexLoRAError, match=re.escape(f"{path} has no entries")):
        read_list(path)


def test_read_list_keeps_order_spaces_in_paths_and_skips_blank_lines(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("images/a b.png 3\n\n  images/c.png\t0  \n")
    assert read_list(path) == [("images/a b.png", 3), ("images/c.png", 0)]


def test_label_beyond_num_classes_names_file_and_line(tmp_path):
    folder = _good_folder(tmp_path / "t")
    assert load_vtab_splits(folder, "test").num_classes == 3  # max label (2, in test.txt) + 1
    with pytest.raises(FlexLoRAError, match=re.escape(f"{folder / 'test.txt'}:1: label 2 is out of range for 2 "
                                                      "classes (labels 0..1)")):
        load_vtab_splits(folder, "test", num_classes=2)
    # the lists of the other protocol count too: test.txt's label 2 is checked under "tune" as well
    with pytest.raises(FlexLoRAError, match=re.escape(f"{folder / 'test.txt'}:1: label 2 is out of range")):
        load_vtab_splits(folder, "tune", num_classes=2)


def test_missing_image_is_found_up_front(tmp_path):
    folder = _good_folder(tmp_path / "t")
    (folder / "images" / "c.png").unlink()
    with pytest.raises(FlexLoRAError, match=re.escape(f"{folder / 'test.txt'}:1: image {folder / 'images/c.png'} "
                                                      "does not exist")):
        load_vtab_splits(folder, "test")
    assert len(load_vtab_splits(folder, "test", check_files=False)["val"]) == 1


def test_unknown_protocol(tmp_path):
    with pytest.raises(FlexLoRAError, match=r"VTAB split must be 'test' .* or 'tune' .*, got 'train'"):
        load_vtab_splits(_good_folder(tmp_path / "t"), "train")  # type: ignore[arg-type]


def test_undecodable_image_names_image_and_list_line(tmp_path):
    lists = {"train800val200.txt": "images/a.png 0\nimages/broken.png 1\n", "test.txt": "images/a.png 0\n"}
    folder = _task_folder(tmp_path / "t", lists, {"images/a.png": None, "images/broken.png": b"not a png"})
    with pytest.raises(FlexLoRAError) as early:  # found when the data is set up, before any training step
        load_vtab_splits(folder, "test")
    assert str(early.value).startswith(f"{folder / 'train800val200.txt'}:2: cannot decode image")
    splits = load_vtab_splits(folder, "test", check_files=False)  # the lazy path still names file and line
    dataset = VTABImageDataset(splits["train"], load_image_processor(_backbone("tiny_vit")))
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(FlexLoRAError) as err:
        dataset[1]
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{folder / 'train800val200.txt'}:2: cannot decode image {folder / 'images/broken.png'}")


# ---------------------------------------------------------------- the real fashion_mnist task


@needs_fashion
def test_fashion_mnist_split_sizes_and_classes():
    test = load_vtab_splits(FASHION, "test")
    assert {k: len(v) for k, v in test.items()} == {"train": 1000, "val": 2000}
    assert test.num_classes == 10
    tune = load_vtab_splits(FASHION, "tune")
    assert {k: len(v) for k, v in tune.items()} == {"train": 800, "val": 200}
    assert tune.num_classes == 10
    first = test["val"][0]
    path, label = first  # a plain (path, label) pair to consumers
    assert isinstance(first, VTABEntry) and path == FASHION / read_list(FASHION / "test.txt")[0][0]
    assert (first.line, first.index, label) == (1, 0, read_list(FASHION / "test.txt")[0][1])
    assert sorted({label for _, label in test["val"]}) == list(range(10))
    again = pickle.loads(pickle.dumps(first))  # spawned DataLoader workers pickle the entries
    assert again == first and (again.where, again.index) == (f"{FASHION / 'test.txt'}:1", 0)


@needs_fashion
def test_fashion_mnist_sample_tensor():
    splits = load_vtab_splits(FASHION, "tune")
    dataset = VTABImageDataset(splits["val"], load_image_processor(_backbone("tiny_vit")))
    item = dataset[5]
    x = item["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert item["labels"] == splits["val"][5][1] and item["idx"] == 5
    assert -1.0 - 1e-6 <= x.min() < -0.9 and 0.0 < x.max() <= 1.0 + 1e-6  # mean = std = 0.5: [0, 1] -> [-1, 1]
    # grayscale -> 3 identical channels
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    with Image.open(splits["val"][5][0]) as image:
        assert image.mode == "L" and image.size == (28, 28)


@needs_fashion
def test_normalisation_is_exact_at_native_size():
    """At 28x28 there is no resize: pixel_values must be (png / 255 - mean) / std exactly, per channel."""
    processor = load_image_processor(_backbone(
        "tiny_vit", "image_size=28", "processor.size.height=28", "processor.size.width=28",
        "processor.image_mean=[0.2,0.4,0.6]", "processor.image_std=[0.5,0.25,0.125]"))
    splits = load_vtab_splits(FASHION, "tune")
    x = VTABImageDataset(splits["train"], processor)[0]["pixel_values"]
    with Image.open(splits["train"][0][0]) as image:
        raw = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    for c, (mean, std) in enumerate([(0.2, 0.5), (0.4, 0.25), (0.6, 0.125)]):
        torch.testing.assert_close(x[c], (raw - mean) / std, atol=1e-5, rtol=0)


@needs_fashion
def test_tiny_vit_forward_backward_on_a_real_batch():
    cfg = _backbone("tiny_vit")
    splits = load_vtab_splits(FASHION, "test")
    dataset = VTABImageDataset(splits["train"], load_image_processor(cfg))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False, collate_fn=collate_images)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (16, 3, 32, 32)
    assert batch["labels"].dtype == torch.long and batch["idx"].tolist() == list(range(16))

    torch.manual_seed(0)
    model = load_image_classifier(cfg, splits.num_classes)
    assert model.training and model.config.num_labels == 10
    adapters = inject(model, cfg.target_modules, form="svd", rank=2, head_modules=list(cfg.head_modules))
    layers = cfg.from_config.num_hidden_layers
    assert sorted(adapters) == [f"vit.layers.{i}.mlp.{fc}" for i in range(layers) for fc in ("fc1", "fc2")]
    out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert out.logits.shape == (16, 10) and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    assert not any("attention" in n for n in trainable)  # mlp preset: the attention stays frozen


# ---------------------------------------------------------------- ViT target presets and backbones


def test_mlp_preset_selects_fc1_fc2_only():
    cfg = _backbone("tiny_vit")
    model = load_image_classifier(cfg, 3)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mlp = [n for n in linear if matches(n, cfg.target_modules)]
    layers = cfg.from_config.num_hidden_layers
    assert mlp == [f"vit.layers.{i}.mlp.{fc}" for i in range(layers) for fc in ("fc1", "fc2")]  # 2 per layer
    attn = [n for n in linear if matches(n, vit_target_modules("attn"))]
    assert attn == [f"vit.layers.{i}.attention.{p}_proj" for i in range(layers) for p in "qkv"]
    assert not any(matches("vit.layers.0.attention.o_proj", rx) for rx in VIT_TARGET_PRESETS.values())
    assert not any(matches("classifier", rx) for rx in VIT_TARGET_PRESETS.values())


def test_presets_match_the_transformers_4_vit_names_too():
    """transformers < 5 names the same maps vit.encoder.layer.N.{attention.attention.query, intermediate.dense,...}."""
    block = "vit.encoder.layer.11"
    names = [f"{block}.attention.attention.{p}" for p in ("query", "key", "value")]
    names += [f"{block}.attention.output.dense", f"{block}.intermediate.dense", f"{block}.output.dense", "classifier"]
    assert [n for n in names if matches(n, VIT_TARGET_PRESETS["mlp"])] == [
        f"{block}.intermediate.dense", f"{block}.output.dense"]
    assert [n for n in names if matches(n, VIT_TARGET_PRESETS["attn"])] == names[:3]


def test_mlp_preset_on_vit_b16_gives_the_papers_1_29m_at_rank_14():
    config = AutoConfig.for_model("vit", num_labels=100)  # the defaults are ViT-B/16 at 224
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (768, 3072, 12)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForImageClassification.from_config(config)
    rank = 14
    chosen = {n: m for n, m in model.named_modules() if matches(n, vit_target_modules("mlp"))}
    assert len(chosen) == 24
    assert {(m.in_features, m.out_features) for m in chosen.values()} == {(768, 3072), (3072, 768)}
    assert sum(rank * (m.in_features + m.out_features) for m in chosen.values()) == 1_290_240
    qkv = [m for n, m in model.named_modules() if matches(n, vit_target_modules("attn"))]
    assert len(qkv) == 36 and sum(rank * (m.in_features + m.out_features) for m in qkv) == 774_144


@pytest.mark.parametrize("name", ["tiny_vit", "vit_b16_in21k"])
def test_backbone_yaml_presets_switch(name):
    cfg = _backbone(name)
    assert cfg.family == "image" and list(cfg.head_modules) == ["classifier"]
    assert dict(cfg.target_presets) == VIT_TARGET_PRESETS
    assert cfg.target_preset == "mlp" and cfg.target_modules == VIT_TARGET_PRESETS["mlp"]
    assert _backbone(name, "target_preset=attn").target_modules == VIT_TARGET_PRESETS["attn"]
    if name == "vit_b16_in21k":
        assert cfg.pretrained == cfg.hub_id == "google/vit-base-patch16-224-in21k"


def test_pretrained_folder_in_the_pre_5_key_layout_loads_every_weight(tmp_path):
    """google/vit-base-patch16-224-in21k ships ViTModel weights named encoder.layer.N.attention.attention.query...;
    they must land in the model (not be silently re-initialised), with a new head of num_labels."""
    from safetensors.torch import save_file
    from transformers import ViTModel

    spec = {k: v for k, v in _backbone("tiny_vit").from_config.items() if k != "model_type"}
    config = AutoConfig.for_model("vit", image_size=32, **spec)
    torch.manual_seed(1)
    state = ViTModel(config).state_dict()
    rename = [(r"^layers\.(\d+)\.", r"encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
              (r"attention\.k_proj", "attention.attention.key"), (r"attention\.v_proj", "attention.attention.value"),
              (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
              (r"mlp\.fc2", "output.dense")]

    def old(key: str) -> str:
        for pattern, repl in rename:
            key = re.sub(pattern, repl, key)
        return key

    if not any(k.startswith("layers.") for k in state):
        pytest.skip("this transformers names ViT weights the old way already")
    folder = tmp_path / "vit"
    folder.mkdir()
    save_file({old(k): v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["ViTModel"]}))
    load_image_processor(_backbone("tiny_vit")).save_pretrained(folder)

    cfg = OmegaConf.merge(_backbone("vit_b16_in21k"), {"pretrained": str(folder)})
    model = load_image_classifier(cfg, 5)
    assert model.training and model.classifier.out_features == 5
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("pooler."):  # the classifier reads the CLS token, not the pooler
            assert torch.equal(loaded[f"vit.{key}"], value), key
    processor = load_image_processor(OmegaConf.merge(cfg, {"processor": {"resample": 3}}))
    assert processor.resample == 3 and (processor.size["height"], processor.size["width"]) == (32, 32)


def test_backbone_errors():
    with pytest.raises(FlexLoRAError, match=r"backbone\.processor has unknown keys \['mean'\]"):
        load_image_processor({"pretrained": None, "processor": {"mean": [0.5]}})
    with pytest.raises(FlexLoRAError, match=r"backbone\.processor is required when backbone\.pretrained is null"):
        load_image_processor({"pretrained": None, "processor": None})
    with pytest.raises(FlexLoRAError, match=r"does not match backbone\.image_size=32"):
        load_image_processor(_backbone("tiny_vit", "processor.size.height=28"))
    with pytest.raises(FlexLoRAError, match=r"needs a model_type"):
        load_image_classifier({"pretrained": None, "from_config": {"hidden_size": 32}}, 3)
    with pytest.raises(FlexLoRAError, match=r"num_labels >= 2"):
        load_image_classifier(_backbone("tiny_vit"), 1)
    with pytest.raises(FlexLoRAError, match=r"unknown ViT target preset 'ffn'"):
        vit_target_modules("ffn")
