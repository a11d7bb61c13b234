"""MimiQ's observation, measured: mean inter-head attention similarity (SSIM per spatial query
patch and head pair, over layers) of the ViT teacher on real test images, Gaussian noise and
each source's synthetic images.

    python benchmarks/vit_similarity.py --images runs/vit-table/cache/psaq.safetensors \
        runs/vit-table/cache/mimiq.safetensors [--real 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from zsq.data import load_dataset
from zsq.models import load_teacher
from zsq.paths import shared_data_dir
from zsq.synth.vit_losses import mean_interhead_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="*", type=Path, default=[], help="safetensors pools")
    parser.add_argument("--real", type=int, default=1000, help="real test images (first N)")
    args = parser.parse_args()
    data = shared_data_dir()
    teacher, meta = load_teacher(None, data / "weights" / "vit_fashionmnist.safetensors")
    test = load_dataset(
        f"fashion-mnist:{data / 'fashion-mnist'}",
        split="test",
        normalize_mean=meta.normalize_mean,
        normalize_std=meta.normalize_std,
    )
    real = torch.stack([test[i][0] for i in range(min(args.real, len(test)))])
    rows = {f"real test images ({len(real)})": real}
    rows["gaussian noise (256)"] = torch.randn(
        256, *real.shape[1:], generator=torch.Generator().manual_seed(0)
    )
    for path in args.images:
        with safe_open(str(path), framework="pt") as f:
            rows[f"{path.stem} ({f.get_tensor('images').shape[0]})"] = f.get_tensor("images")
    result = {name: round(mean_interhead_similarity(teacher, x), 4) for name, x in rows.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
