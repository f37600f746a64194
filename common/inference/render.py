"""Snapshots of phantom (or real BraTS 2023) cases: T1c and FLAIR through the tumour centre.

Display follows radiological convention: axial and coronal views show the patient's right on the
viewer's left, superior/anterior up; sagittal views face the viewer's left.
"""

from __future__ import annotations

from pathlib import Path

from fedbrats.common.data.contract import POPULATION_NAMES, POPULATIONS, SEG_KEY
from fedbrats.common.utils.plotting import pyplot

# label -> (name, RGB)
LABEL_STYLE = {
    1: ("NETC (necrosis / non-enhancing core)", (0.90, 0.10, 0.10)),
    2: ("SNFH (oedema)", (0.15, 0.80, 0.15)),
    3: ("ET (enhancing tumour)", (1.00, 0.90, 0.00)),
}


def _case_files(case_dir: Path) -> dict[str, Path]:
    case_dir = Path(case_dir)
    cid = case_dir.name
    files = {k: case_dir / f"{cid}-{k}.nii.gz" for k in ("t1c", "t2f", SEG_KEY)}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"case {cid}: missing {', '.join(missing)}")
    return files


def _tumour_centre(seg):
    """Voxel centre of the largest connected lesion (26-connectivity); grid centre if none."""
    import numpy as np
    from scipy import ndimage

    tumour = seg > 0
    if not tumour.any():
        return tuple(int(n // 2) for n in seg.shape)
    lab, n = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum_labels(tumour, lab, index=np.arange(1, n + 1))
    largest = int(np.argmax(sizes)) + 1
    # centre of the core (ET + NETC) when the largest lesion has one, else of the whole lesion
    region = lab == largest
    core = region & ((seg == 1) | (seg == 3))
    com = ndimage.center_of_mass(core if core.any() else region)
    return tuple(int(round(c)) for c in com)


def _views(vol, centre, zooms):
    """The three orthogonal slices of a RAS volume, oriented for display with imshow(origin=
    'upper'), plus their pixel aspect ratios."""
    import numpy as np

    i, j, k = centre
    zx, zy, zz = zooms
    # axial: rows anterior->posterior (top = anterior), columns patient right->left
    axial = np.flipud(vol[::-1, :, k].T)
    # coronal: rows superior->inferior, columns patient right->left
    coronal = np.flipud(vol[::-1, j, :].T)
    # sagittal: rows superior->inferior, columns anterior->posterior (faces viewer's left)
    sagittal = np.flipud(vol[i, ::-1, :].T)
    return [(axial, zy / zx), (coronal, zz / zx), (sagittal, zz / zy)]


def render_views(
    volumes: dict[str, object], seg, zooms, out_png, title: str, overlay: bool = True,
    heat=None,
) -> Path:
    """Draw a 2x3 figure of RAS arrays: one row per entry of ``volumes`` (display name ->
    volume), columns axial, coronal and sagittal through the largest lesion of ``seg``, the labels
    outlined (NETC also filled) unless ``overlay`` is false; an all-zero volume is a black panel
    saying it is missing. ``heat`` (a RAS map in [0, 1], say a Grad-CAM) is drawn over each
    slice in the ``jet`` colours where it exceeds 0.1, with a colour bar. Saved as
    ``out_png``."""
    import numpy as np
    from matplotlib.patches import Patch

    plt = pyplot()

    seg = np.asarray(seg)
    centre = _tumour_centre(seg)
    colours = np.zeros((4, 4), dtype=float)
    for lab, (_, rgb) in LABEL_STYLE.items():
        colours[lab] = (*rgb, 0.13)
    seg_views = _views(seg, centre, zooms)
    heat_views = _views(np.asarray(heat, dtype=np.float32), centre, zooms) if heat is not None \
        else [None] * 3
    shown = None

    fig, axes = plt.subplots(len(volumes), 3, figsize=(10.5, 7.6), facecolor="black",
                             squeeze=False)
    for row, (name, vol) in enumerate(volumes.items()):
        vol = np.asarray(vol, dtype=np.float32)
        brain = vol[vol > 0]
        vmax = float(np.percentile(brain, 99.5)) if brain.size else 1.0
        for col, ((sl, aspect), (lab_sl, _), heat_view, view) in enumerate(
            zip(_views(vol, centre, zooms), seg_views, heat_views,
                ("axial", "coronal", "sagittal"))
        ):
            ax = axes[row, col]
            ax.imshow(sl, cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="bilinear")
            if heat_view is not None:
                h = heat_view[0]
                shown = ax.imshow(np.ma.masked_less(h, 0.1), cmap="jet", vmin=0, vmax=1,
                                  alpha=0.5, aspect=aspect, interpolation="bilinear")
            if not vol.any():
                ax.text(0.5, 0.5, f"{name} missing", color="white", ha="center", va="center",
                        transform=ax.transAxes)
            for lab, (_, rgb) in LABEL_STYLE.items() if overlay else ():
                if lab == 1:
                    ax.imshow(colours[lab_sl], aspect=aspect, interpolation="nearest")
                if (lab_sl == lab).any():
                    ax.contour(lab_sl == lab, levels=[0.5], colors=[rgb], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_title(f"{name} {view}", color="white", fontsize=10)
            left, right = ("R", "L") if col != 2 else ("A", "P")
            ax.text(0.02, 0.5, left, color="white", fontsize=9, transform=ax.transAxes,
                    va="center")
            ax.text(0.98, 0.5, right, color="white", fontsize=9, transform=ax.transAxes,
                    va="center", ha="right")
    handles = [Patch(facecolor=rgb, edgecolor=rgb, label=name) for name, rgb in
               LABEL_STYLE.values()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9,
               labelcolor="white")
    fig.suptitle(title, color="white", fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 0.93 if shown is not None else 1, 0.95))
    if shown is not None:
        bar = fig.colorbar(shown, cax=fig.add_axes((0.94, 0.2, 0.015, 0.6)))
        bar.ax.tick_params(colors="white", labelsize=8)
        bar.set_label("Grad-CAM", color="white", fontsize=9)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=76, facecolor="black")
    plt.close(fig)
    return out_png


def render_case(
    case_dir: Path, out_png: Path, title: str | None = None, overlay: bool = True
) -> Path:
    """Draw a 2x3 figure (rows T1c and FLAIR; columns axial, coronal, sagittal) through the
    largest lesion's centre, with the segmentation overlaid (unless ``overlay`` is false: then
    only the images, to judge them), and save it as ``out_png``."""
    import nibabel as nib
    import numpy as np

    files = _case_files(Path(case_dir))
    loaded = {}
    zooms = None
    for key, path in files.items():
        img = nib.as_closest_canonical(nib.load(str(path)))  # RAS, whatever the file's axes
        loaded[key] = np.asarray(img.dataobj)
        zooms = img.header.get_zooms()[:3]
    seg = np.rint(loaded[SEG_KEY]).astype(np.uint8)
    cid = Path(case_dir).name
    if title is None:
        pop = next((p for p in POPULATIONS if f"-{p}-" in cid), None)
        title = f"{cid}: {POPULATION_NAMES[pop]}" if pop else cid
    return render_views({"T1c": loaded["t1c"], "FLAIR": loaded["t2f"]}, seg, zooms, out_png,
                        title, overlay=overlay)


def render_dataset(data_dir, out_dir) -> list[Path]:
    """One PNG per population folder of ``data_dir`` (its first case): ``phantom-GLI.png``..."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    written = []
    for pop in POPULATIONS:
        folder = data_dir / pop
        if not folder.is_dir():
            continue
        cases = sorted(p for p in folder.iterdir() if p.is_dir())
        if not cases:
            continue
        written.append(render_case(cases[0], out_dir / f"phantom-{pop}.png"))
    if not written:
        raise FileNotFoundError(f"no population folders ({', '.join(POPULATIONS)}) in {data_dir}")
    return written
