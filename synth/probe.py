"""Evidence that the prompt encoder's features see the degradation, not the content.

`probe` embeds random crops of images of known degradation types (rain, haze, snow, ...) with the frozen
contrastive features, and scores a leave-one-image-out nearest-neighbour classifier: each crop is labelled
by its most similar crop from a *different* image, so matching content (or the same photo) cannot help.
Chance is 1 / number of types. The result also holds the features' first two principal components per crop
(`points`, `labels`), which `d4ir probe` plots coloured by type.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from d4ir.shards.folders import list_files
from d4ir.shards.images import ImageSkipped, random_windows, read_rgb, to_tensor
from torch import nn


def images_by_subfolder(root: str | Path) -> dict[str, list[Path]]:
    """{subfolder name: files below it} for a folder laid out as root/<type>/... (hidden folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"probe folder not found: {root}")
    return {d.name: list_files(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _crops(path: Path, crop: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n random crop x crop windows of one image: [n, 3, crop, crop]."""
    img = to_tensor(read_rgb(path, min_side=crop))  # [3, H, W]
    windows = random_windows(rng, img.shape[1], img.shape[2], crop, n)
    return torch.stack([img[:, y : y + crop, x : x + crop] for y, x in windows])


@torch.no_grad()
def probe(
    encoder: nn.Module,
    images_by_type: dict[str, list[Path]],
    *,
    crop: int = 64,
    crops_per_image: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Leave-one-image-out nearest-neighbour accuracy of the frozen contrastive features.

    Args:
        encoder: anything with `features(x [B,3,h,w] in [0,1]) -> [B, F]` (a PromptEncoder); run in eval
            mode and put back in its previous mode afterwards.
        images_by_type: degradation type -> image paths; at least 2 types, each with at least 2 readable
            images at least `crop` pixels on the short side (others are skipped and listed).
        crop: side of the crops (use the training crop).
        crops_per_image: random crops per image (seeded by `seed`, so the probe is repeatable).
        seed: crop positions.
        batch_size: crops per encoder call.
        device: torch device.
    Returns:
        {"accuracy", "chance", "per_type" {type: accuracy}, "num_types", "num_images", "num_crops",
         "explained_variance" [2], "skipped" [(path, reason)], "types" [names], "points" [M, 2] and
         "labels" [M] (type index per crop) for a PCA plot}.
    """
    types = list(images_by_type)
    if len(types) < 2:
        raise ValueError(f"the probe needs at least 2 degradation types, got {types}")
    if crop < 1 or crops_per_image < 1:
        raise ValueError(f"crop and crops_per_image must be >= 1, got {crop} and {crops_per_image}")
    crops, labels, image_ids, skipped = [], [], [], []
    per_type_images = dict.fromkeys(types, 0)
    tried = 0  # every listed image gets its own crop stream, whether or not earlier ones were skipped
    for t, name in enumerate(types):
        for path in images_by_type[name]:
            rng = np.random.default_rng([seed, tried])
            tried += 1
            try:
                c = _crops(Path(path), crop, crops_per_image, rng)
            except ImageSkipped as err:
                skipped.append((Path(path), err.reason))
                continue
            image_ids += [len(crops)] * len(c)
            crops.append(c)
            labels += [t] * len(c)
            per_type_images[name] += 1
    short = {k: v for k, v in per_type_images.items() if v < 2}
    if short:
        raise ValueError(f"each type needs at least 2 usable images for a leave-one-image-out probe: {short}")

    was_training = encoder.training
    encoder.eval()
    try:
        x = torch.cat(crops)  # [M, 3, crop, crop]
        feats = torch.cat([encoder.features(x[i : i + batch_size].to(device)).float().cpu()
                           for i in range(0, len(x), batch_size)])
    finally:
        encoder.train(was_training)
    feats = F.normalize(feats, dim=1)  # [M, F]
    lab, ids = torch.tensor(labels), torch.tensor(image_ids)

    sim = feats @ feats.T  # cosine similarity [M, M]
    sim[ids[:, None] == ids[None, :]] = -float("inf")  # never match a crop of the same image
    pred = lab[sim.argmax(dim=1)]
    correct = (pred == lab).float()
    per_type = {name: float(correct[lab == t].mean()) for t, name in enumerate(types)}

    centred = feats - feats.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    points = (centred @ vh[:k].T).numpy()
    if k < 2:
        points = np.concatenate([points, np.zeros((len(points), 2 - k), points.dtype)], axis=1)
    var = (s**2 / (s**2).sum().clamp_min(1e-12)).tolist()
    result = {
        "accuracy": float(correct.mean()),
        "chance": 1.0 / len(types),
        "per_type": per_type,
        "num_types": len(types),
        "num_images": len(crops),
        "num_crops": len(lab),
        "explained_variance": (var + [0.0, 0.0])[:2],
        "skipped": skipped,
        "types": types,
        "points": points,
        "labels": lab.numpy(),
    }
    return result
