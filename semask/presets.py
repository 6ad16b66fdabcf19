"""Released SeMask-FPN models: architecture presets and the label sets of their datasets.

Class names follow the original code's dataset definitions (mmsegmentation 0.x ``ADE20KDataset``,
``CityscapesDataset`` and ``COCOStuffDataset``), in label-index order.
"""

ADE20K_LABELS = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed ",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

CITYSCAPES_LABELS = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

COCO_STUFF_LABELS = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
    "banner",
    "blanket",
    "branch",
    "bridge",
    "building-other",
    "bush",
    "cabinet",
    "cage",
    "cardboard",
    "carpet",
    "ceiling-other",
    "ceiling-tile",
    "cloth",
    "clothes",
    "clouds",
    "counter",
    "cupboard",
    "curtain",
    "desk-stuff",
    "dirt",
    "door-stuff",
    "fence",
    "floor-marble",
    "floor-other",
    "floor-stone",
    "floor-tile",
    "floor-wood",
    "flower",
    "fog",
    "food-other",
    "fruit",
    "furniture-other",
    "grass",
    "gravel",
    "ground-other",
    "hill",
    "house",
    "leaves",
    "light",
    "mat",
    "metal",
    "mirror-stuff",
    "moss",
    "mountain",
    "mud",
    "napkin",
    "net",
    "paper",
    "pavement",
    "pillow",
    "plant-other",
    "plastic",
    "platform",
    "playingfield",
    "railing",
    "railroad",
    "river",
    "road",
    "rock",
    "roof",
    "rug",
    "salad",
    "sand",
    "sea",
    "shelf",
    "sky-other",
    "skyscraper",
    "snow",
    "solid-other",
    "stairs",
    "stone",
    "straw",
    "structural-other",
    "table",
    "tent",
    "textile-other",
    "towel",
    "tree",
    "vegetable",
    "wall-brick",
    "wall-concrete",
    "wall-other",
    "wall-panel",
    "wall-stone",
    "wall-tile",
    "wall-wood",
    "water-other",
    "waterdrops",
    "window-blind",
    "window-other",
    "wood",
)

SWIN_SIZES = {
    "tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "small": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "base": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 12},
    "large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12},
}

DATASET_LABELS = {"ade20k": ADE20K_LABELS, "cityscapes": CITYSCAPES_LABELS, "coco-stuff10k": COCO_STUFF_LABELS}
# The original test pipelines: keep-ratio resize to fit (2048, 512) or (2048, 1024); ADE20K and COCO-Stuff drop
# label 0 ("other"/unlabelled) and shift the rest down by one.
DATASET_PROCESSING = {
    "ade20k": {"size": {"shortest_edge": 512, "longest_edge": 2048}, "do_reduce_labels": True},
    "cityscapes": {"size": {"shortest_edge": 1024, "longest_edge": 2048}, "do_reduce_labels": False},
    "coco-stuff10k": {"size": {"shortest_edge": 512, "longest_edge": 2048}, "do_reduce_labels": True},
}


def fpn_semantic_attention(embed_dim: int, num_labels: int, num_stages: int = 4) -> tuple[str, ...]:
    """The original SeMask-FPN rule for each stage's semantic attention kind.

    With ``embed_dim`` 96 or 192 and more than 19 classes, stages 1-2 are windowed and the later stages
    global; otherwise every stage is windowed.
    """
    if embed_dim in (96, 192) and num_labels > 19:
        return ("windowed", "windowed") + ("global",) * (num_stages - 2)
    return ("windowed",) * num_stages


def fpn_preset(name: str) -> dict:
    """Keyword arguments of `SemaskConfig` for a released SeMask-FPN model, e.g. ``"semask-tiny-fpn-ade20k"``.

    The semantic attention kinds are left to the config, which applies the original rule to the final label set.
    """
    prefix, size, head, dataset = (name.split("-", 3) + ["", "", "", ""])[:4]
    if prefix != "semask" or head != "fpn" or size not in SWIN_SIZES or dataset not in DATASET_LABELS:
        raise ValueError(f"Unknown SeMask preset {name!r}; expected one of: {', '.join(PRESET_NAMES)}.")
    swin = SWIN_SIZES[size]
    labels = DATASET_LABELS[dataset]
    return {
        **swin,
        "semantic_window_size": swin["window_size"],
        "drop_path_rate": 0.3,
        "decoder_hidden_size": 256,
        "id2label": dict(enumerate(labels)),
    }


PRESET_NAMES = tuple(f"semask-{size}-fpn-{dataset}" for dataset in DATASET_LABELS for size in SWIN_SIZES)


# How many leading stages have windowed semantic attention (the rest global) in each original detectron2 codebase,
# whatever the class count (`BasicLayer`'s `i in [...]` test); SeMask-Mask2Former's own copy instead makes only the
# last stage global with exactly 150 classes and every stage windowed otherwise.
WINDOWED_STAGES = {"maskformer": 3, "fapn": 2, "msfapn": 2}


def mask2former_semantic_attention(
    num_labels: int, num_stages: int = 4, pixel_decoder: str = "msdeformattn"
) -> tuple[str, ...]:
    """The original rule for each stage's semantic attention kind in SeMask-Mask2Former (`pixel_decoder`
    "msdeformattn": with exactly 150 classes only the last stage is global, otherwise every stage is windowed) and in
    SeMask-FaPN ("fapn" / "msfapn": the first two stages windowed, the rest global, for any class count)."""
    if pixel_decoder in WINDOWED_STAGES:
        windowed = WINDOWED_STAGES[pixel_decoder]
    else:
        windowed = num_stages - 1 if num_labels == 150 else num_stages
    return ("windowed",) * windowed + ("global",) * (num_stages - windowed)


def maskformer_semantic_attention(num_stages: int = 4) -> tuple[str, ...]:
    """The original SeMask-MaskFormer rule: the first three stages windowed, the rest global, for any class count."""
    windowed = WINDOWED_STAGES["maskformer"]
    return ("windowed",) * windowed + ("global",) * (num_stages - windowed)


# The released SeMask-Mask2Former models (Swin-L, ImageNet-22k 384 pre-training): their original configs
# (`SeMask-Mask2Former/configs/*/semantic-segmentation/semask_swin/*`). The Cityscapes config keeps the default
# semantic window (7) while its Swin window is 12.
MASK2FORMER_SEMANTIC_WINDOW = {"ade20k": 12, "cityscapes": 7}
# The original (detectron2) test pipelines: shortest side to MIN_SIZE_TEST, longest side at most MAX_SIZE_TEST
# (the same keep-ratio rule), resized with PIL as detectron2's ResizeTransform does.
MASK2FORMER_PROCESSING = {
    "ade20k": {"size": {"shortest_edge": 640, "longest_edge": 2560}, "do_reduce_labels": True, "resize_library": "pil"},
    "cityscapes": {
        "size": {"shortest_edge": 1024, "longest_edge": 2048},
        "do_reduce_labels": False,
        "resize_library": "pil",
    },
}
# The released FaPN / MSFaPN models (ADE20K only): the ADE20K SeMask-Mask2Former config with another pixel decoder
# (`SeMask-FAPN/SeMask-Mask2Former/configs/ade20k/semantic-segmentation/semask_swin/{fapn,msfapn}_*`).
MASK2FORMER_PIXEL_DECODERS = {"": "msdeformattn", "fapn-": "fapn", "msfapn-": "msfapn"}
MASK2FORMER_PRESET_NAMES = tuple(f"semask-large-mask2former-{dataset}" for dataset in MASK2FORMER_SEMANTIC_WINDOW) + (
    "semask-large-mask2former-fapn-ade20k",
    "semask-large-mask2former-msfapn-ade20k",
)


def mask2former_preset_dataset(name: str) -> str:
    """The dataset key of a released SeMask-Mask2Former preset, e.g. "ade20k"."""
    if name not in MASK2FORMER_PRESET_NAMES:
        raise ValueError(
            f"Unknown SeMask-Mask2Former preset {name!r}; expected one of: {', '.join(MASK2FORMER_PRESET_NAMES)}."
        )
    return name.rsplit("-", 1)[1]


def mask2former_preset(name: str) -> dict:
    """Keyword arguments of `SemaskMask2FormerConfig` for a released model, e.g. ``"semask-large-mask2former-ade20k"``
    or ``"semask-large-mask2former-msfapn-ade20k"``.

    The Mask2Former settings are `Mask2FormerConfig`'s defaults, which equal the original configs (256 channels,
    100 queries, 6 deformable encoder layers with a 1024-wide FFN, DEC_LAYERS 10, loss weights 2 / 5 / 5); the FaPN /
    MSFaPN models differ only in their pixel decoder.
    """
    dataset = mask2former_preset_dataset(name)
    decoder_part = name.removeprefix("semask-large-mask2former-").removesuffix(dataset)
    swin = SWIN_SIZES["large"]
    id2label = dict(enumerate(DATASET_LABELS[dataset]))
    backbone = {
        **swin,
        "image_size": 384,
        "semantic_window_size": MASK2FORMER_SEMANTIC_WINDOW[dataset],
        "drop_path_rate": 0.3,
        "id2label": id2label,
    }
    return {
        "backbone_config": backbone,
        "id2label": id2label,
        "pixel_decoder": MASK2FORMER_PIXEL_DECODERS[decoder_part],
    }


# The released SeMask-MaskFormer model (Swin-L, ImageNet-22k 384 pre-training; `SeMask-MaskFormer/configs/ade20k-150/
# semask_swin/maskformer_semask_swin_large_IN21k_384_bs16_160k_res640.yaml`), tested with SeMask-Mask2Former's ADE20K
# pipeline (the same MIN_SIZE_TEST / MAX_SIZE_TEST).
MASKFORMER_PRESET_NAMES = ("semask-large-maskformer-ade20k",)


def maskformer_preset(name: str) -> dict:
    """Keyword arguments of `SemaskMaskFormerConfig` for the released model ``"semask-large-maskformer-ade20k"``.

    The MaskFormer settings are `SemaskMaskFormerConfig`'s defaults, which equal the original config (256 channels,
    100 queries, 6 decoder layers with a 2048-wide FFN, loss weights 1 / 20 / 1, semantic loss 0.4).
    """
    if name not in MASKFORMER_PRESET_NAMES:
        raise ValueError(
            f"Unknown SeMask-MaskFormer preset {name!r}; expected one of: {', '.join(MASKFORMER_PRESET_NAMES)}."
        )
    id2label = dict(enumerate(DATASET_LABELS["ade20k"]))
    backbone = {
        **SWIN_SIZES["large"],
        "image_size": 384,
        "semantic_window_size": 12,
        "drop_path_rate": 0.3,
        "id2label": id2label,
    }
    return {"backbone_config": backbone, "id2label": id2label}


# SeMask-MiT: SeMask on SegFormer's Mix Transformer (the paper's second encoder; no official code or weights). The
# encoder sizes are SegFormer's MiT-B0 ... B5 (`nvidia/mit-b*` configs): stage widths, depths and the all-MLP head's
# width; every size has SegFormer's heads (1, 2, 5, 8), sequence-reduction ratios (8, 4, 2, 1) and drop path 0.1.
MIT_SIZES = {
    "b0": {"hidden_sizes": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 6, 3), "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 18, 3), "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 8, 27, 3), "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 6, 40, 3), "decoder_hidden_size": 768},
}
MIT_STAGE_SETTINGS = {"num_attention_heads": (1, 2, 5, 8), "sr_ratios": (8, 4, 2, 1), "drop_path_rate": 0.1}
MIT_PRESET_NAMES = tuple(f"semask-mit-{size}-ade20k" for size in MIT_SIZES)
# SegFormer's ADE20K test pipelines (mmseg 0.x): SeMask-FPN's ADE20K one (keep-ratio resize to fit (2048, 512), the
# same normalisation, label reduction); B5 was trained on 640 x 640 crops and is tested at (2048, 640).
MIT_PROCESSING = {
    **{size: DATASET_PROCESSING["ade20k"] for size in MIT_SIZES},
    "b5": {**DATASET_PROCESSING["ade20k"], "size": {"shortest_edge": 640, "longest_edge": 2048}},
}


def mit_semantic_attention(num_labels: int, num_stages: int = 4) -> tuple[str, ...]:
    """SeMask-MiT's rule for each stage's semantic attention kind (a design choice following SeMask-Swin's FPN rule
    for the paper's ADE20K models): the last two stages global with more than 19 classes, otherwise every stage
    windowed."""
    num_global = min(2, num_stages) if num_labels > 19 else 0
    return ("windowed",) * (num_stages - num_global) + ("global",) * num_global


def mit_preset_size(name: str) -> str:
    """The MiT size of a SeMask-MiT preset, e.g. "b0"."""
    if name not in MIT_PRESET_NAMES:
        raise ValueError(f"Unknown SeMask-MiT preset {name!r}; expected one of: {', '.join(MIT_PRESET_NAMES)}.")
    return name.split("-")[2]


def mit_preset(name: str) -> dict:
    """Keyword arguments of `SemaskMitConfig` for a SeMask-MiT model, e.g. ``"semask-mit-b0-ade20k"``: SegFormer's
    MiT size with the ADE20K labels, the all-MLP head and one semantic block per stage (kinds left to the config's
    rule)."""
    return {**MIT_SIZES[mit_preset_size(name)], **MIT_STAGE_SETTINGS, "id2label": dict(enumerate(ADE20K_LABELS))}


def mit_processing(name: str) -> dict:
    """Keyword arguments of `SemaskImageProcessor` for a SeMask-MiT preset: SegFormer's ADE20K test pipeline."""
    settings = MIT_PROCESSING[mit_preset_size(name)]
    return {**settings, "size": dict(settings["size"])}
