"""Preview pictures of a dataset: the noise-free image, a noisy copy and the label, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io.files import atomic_path
from ..noise import poisson_counts
from .records import PREVIEW_DOSE_E_PER_A2, iter_shard
from .shards import ShardPlan


def write_previews(out: Path, plan: list[ShardPlan], k: int, seed: int) -> None:
    """The first ``k`` examples of ``out`` (in shard order) as ``preview/example-NNNNN.png``,
    the noisy panel at :data:`PREVIEW_DOSE_E_PER_A2` e⁻/Å² (seeded); existing ones kept."""
    if k <= 0:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "preview"
    done = 0
    for shard in plan:
        if done >= k:
            break
        for rec in iter_shard(out / shard.name):
            if done >= k:
                break
            path = pdir / f"example-{done:05d}.png"
            done += 1
            if path.exists():
                continue
            image, label, px = rec["image"], rec["label"], float(rec["pixel_size"])
            rng = np.random.default_rng([seed, done - 1])
            noisy = poisson_counts(rng, image, PREVIEW_DOSE_E_PER_A2, px)
            meta = json.loads(rec["metadata"])
            fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
            axes[0].imshow(image, cmap="gray")
            axes[0].set_title("image (noise-free, vacuum = 1)")
            axes[1].imshow(noisy, cmap="gray")
            axes[1].set_title(f"noisy, {PREVIEW_DOSE_E_PER_A2:g} e⁻/Å²")
            im = axes[2].imshow(label, cmap="viridis", vmin=0, interpolation="nearest")
            axes[2].set_title("label (column height, atoms)")
            fig.colorbar(im, ax=axes[2], fraction=0.046)
            for ax in axes:
                ax.set_axis_off()
            facts = [f"{key}={meta[key]:.3g}" for key in ("defocus_nm", "cs_um", "diameter_A")
                     if isinstance(meta.get(key), (int, float))]
            fig.suptitle(f"{shard.split} · particle {meta.get('particle_id', '?')} · pixel {px:g} Å  "
                         + "  ".join(facts), fontsize=9)
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=80)
            plt.close(fig)
