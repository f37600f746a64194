"""``fedbrats export``: a student as a MONAI bundle, to be run by MONAI users without fedbrats.

The bundle (MONAI's layout, https://docs.monai.io/en/stable/mb_specification.html)::

    DIR/configs/metadata.json    MONAI's metadata, with a "fedbrats" section: channel order, label
                                 convention, labels, regions, spacing, patch size, post-processing
                                 thresholds, network (MONAI class, arguments, MONAI version), round,
                                 and the SHA-256 of the student file it came from
    DIR/configs/inference.json   the same steps as ``fedbrats predict`` in MONAI components
    DIR/models/model.pt          the network's weights (a state dict)
    DIR/scripts/postprocess.py   fedbrats' post-processing (numpy and scipy only; the very file
                                 :mod:`fedbrats.common.inference.postprocessing`)
    DIR/docs/README.md           how to run it

``inference.json``: ``LoadImaged`` of a BraTS case folder's four contrasts (``*-t1n.nii.gz``,
``*-t1c``, ``*-t2w``, ``*-t2f``; or every case folder of ``dataset_dir``), ``Orientationd`` RAS,
``CropForegroundd`` to the voxels non-zero in any contrast, ``Spacingd`` to the student's
spacing, ``NormalizeIntensityd`` inside the brain per contrast; ``SlidingWindowInferer``
(Gaussian blending, overlap 0.5, 2 windows a batch); softmax, ``Invertd`` back to the input's
grid (trilinear), argmax, post-processing, ``SaveImaged`` as ``OUTPUT_DIR/<case folder>.nii.gz``
in the BraTS 2023 labels. It runs in MONAI's ``SupervisedEvaluator`` (pytorch-ignite), as the
MONAI Model Zoo's bundles do::

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --dataset_dir /data/BraTS-GLI-00001-000 --output_dir preds

A student with one head per population exports one population's head (``population``): MONAI
builds the plain network, whose last block is that head.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Final

from fedbrats.common.data.contract import CONTRASTS, LABELS, REGIONS
from fedbrats.common.utils.files import file_sha256

__all__ = ["BUNDLE_VERSION", "ExportError", "bundle_network_def", "export_bundle"]

BUNDLE_VERSION: Final = "0.1.0"
"""The bundle's own version (metadata ``version``), bumped when this layout changes."""

_SCHEMA: Final = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20220324.json"
)


class ExportError(ValueError):
    """The student cannot be exported as asked; the message says why and what to do."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def bundle_network_def(spec, heads_target: str = "scripts.heads.with_population_heads"
                       ) -> dict[str, Any]:
    """``network_def`` of ``inference.json``: the MONAI network of ``spec``; for a student with
    one head per population, wrapped by ``heads_target`` (the bundle's copy of
    :func:`fedbrats.common.networks.heads.with_population_heads`), the head chosen by the
    config's ``population`` (null: their mean, as ``fedbrats predict`` without
    ``--population``)."""
    from fedbrats.common.networks.models import HEAD_BLOCKS, POPULATION_HEADS, constructor_kwargs

    kwargs = constructor_kwargs(spec)
    heads = kwargs.pop(POPULATION_HEADS, None)
    net = {
        "_target_": f"monai.networks.nets.{spec.arch}",
        "spatial_dims": 3,
        "in_channels": len(CONTRASTS),
        "out_channels": len(LABELS),
        **_jsonable(kwargs),
    }
    if not heads:
        return net
    return {"_target_": heads_target, "net": net, "block": HEAD_BLOCKS[spec.arch],
            "populations": list(heads), "population": "@population"}


def _inference_config(network_def: dict, spacing, patch, thresholds, population: str | None
                      ) -> dict[str, Any]:
    pp = (f"$lambda x: __import__('scripts.postprocess', fromlist=['clean_label_tensor'])"
          f".clean_label_tensor(x, {float(thresholds.min_component_mm3)!r}, "
          f"{float(thresholds.et_min_mm3)!r})")
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import numpy",
                    "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "/data/BraTS-GLI-00001-000",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "channels": list(CONTRASTS),
        "case_dirs": (
            "$[@dataset_dir] if glob.glob(os.path.join(@dataset_dir, '*-t1n.nii*')) else "
            "sorted(os.path.dirname(p) for p in "
            "glob.glob(os.path.join(@dataset_dir, '*', '*-t1n.nii*')))"
        ),
        "datalist": (
            "$[{'image': [sorted(glob.glob(os.path.join(d, '*-' + c + '.nii*')))[0] "
            "for c in @channels]} for d in @case_dirs]"
        ),
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "population": population,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
                {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                 "select_fn": "$lambda x: x != 0"},
                {"_target_": "Spacingd", "keys": "image",
                 "pixdim": [float(s) for s in spacing], "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True,
                 "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1,
                       "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(p) for p in patch],
                    "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
                 "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Lambdad", "keys": "pred", "func": pp},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
                 "output_postfix": "", "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8",
                 "resample": False, "separate_folder": False, "print_log": False,
                 "output_name_formatter": (
                     "$lambda metadict, saver: {'subject': os.path.basename(os.path.dirname("
                     "str(metadict['filename_or_obj']))), 'idx': None}")},
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader",
             "load_path": "$os.path.join(@bundle_root, 'models', 'model.pt')",
             "load_dict": {"model": "@network"}, "map_location": "@device", "strict": True},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network",
                      "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$sys.path.insert(0, os.path.abspath(@bundle_root))",
                       "$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("monai", "torch", "numpy", "nibabel", "scipy", "pytorch-ignite", "fire",
                 "fedbrats"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _metadata(student, network_def: dict, source: Path, population: str | None) -> dict:
    v = _versions()
    patch = [int(p) for p in student.patch_size]
    return {
        "schema": _SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by fedbrats {v['fedbrats']}"},
        "monai_version": v["monai"],
        "pytorch_version": v["torch"],
        "numpy_version": v["numpy"],
        "required_packages_version": {k: v[k] for k in ("nibabel", "scipy", "pytorch-ignite",
                                                         "fire")},
        "name": "fedbrats brain tumour segmentation student",
        "task": "Multi-population brain tumour segmentation (BraTS: GLI, SSA, PED, MEN, MET)",
        "description": (
            "A student network distilled from one teacher per population by federated "
            "knowledge distillation (fedbrats). Input: the four BraTS MRI contrasts of a "
            "skull-stripped case; output: BraTS 2023 labels on the input's grid."
        ),
        "authors": "the fedbrats consortium run that trained it",
        "copyright": "the fedbrats consortium run that trained it",
        "data_source": "the consortium sites' own cases (never pooled)",
        "data_type": "nibabel",
        "image_classes": "4 channels, in order: " + ", ".join(student.channels),
        "label_classes": "; ".join(f"{k} {v}" for k, v in LABELS.items()),
        "intended_use": "research; not for clinical use",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR",
                "num_channels": len(student.channels), "spatial_shape": patch,
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): c for i, c in enumerate(student.channels)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(LABELS),
                "spatial_shape": patch, "dtype": "float32", "value_range": [],
                "is_patch_data": True,
                "channel_def": {str(k): v for k, v in LABELS.items()},
            }},
        },
        "fedbrats": {
            "channels": list(student.channels),
            "label_convention": student.label_convention,
            "labels": {str(k): v for k, v in LABELS.items()},
            "regions": {k: list(r) for k, r in REGIONS.items()},
            "spacing_mm": [float(s) for s in student.spacing],
            "patch_size": patch,
            "postprocess": student.postprocess.to_dict(),
            "network": {"class": network_def.get("net", network_def)["_target_"],
                        "spec": student.spec.to_dict(), "population_heads": list(student.heads),
                        "monai_version": v["monai"]},
            "population_head": population,
            "round": student.round,
            "source": source.name,
            "source_sha256": file_sha256(source).hex(),
        },
    }


_README = """# {name}

Exported by `fedbrats export` from `{source}` (round {round}). Runs with MONAI alone
(`pip install "monai[ignite,fire]=={monai}" nibabel scipy`), no fedbrats needed:

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /data/BraTS-GLI-00001-000 --output_dir preds
```

`dataset_dir` is one BraTS case folder (`*-t1n.nii.gz`, `*-t1c`, `*-t2w`, `*-t2f`, all four) or a
folder of them; each case's segmentation is written as `OUTPUT_DIR/<case folder>.nii.gz`, on the
input's grid, in the BraTS 2023 labels (0 background, 1 NETC, 2 SNFH, 3 ET).

- Channels: {channels}. Spacing: {spacing} mm. Sliding windows: {patch} voxels.
- Post-processing (`scripts/postprocess.py`): tumour components under {min_mm3} mm^3 removed,
  an enhancing tumour under {et_mm3} mm^3 in all relabelled NETC.
- Network: `{cls}` ({arguments}), MONAI {monai}.
"""


def export_bundle(model: str | Path, out: str | Path, population: str | None = None,
                  overwrite: bool = False) -> Path:
    """Write the bundle of the student file ``model`` to ``out`` (see the module docstring).

    The exported weights are checked at once: the network MONAI's config builds from
    ``network_def`` loads them strictly and gives the student's logits on a random window.
    Raises :class:`ExportError` (and ``ModelFileError`` for a bad student file).
    """
    import torch
    from monai.bundle import ConfigParser

    from fedbrats.common.inference.modelfile import load_student

    model, out = Path(model), Path(out)
    student = load_student(model, population=population)
    if population is not None and not student.heads:
        raise ExportError(f"{model} has a single last block, not one head per population: "
                          "leave out --population")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not an empty folder; pass --overwrite to "
                          "replace it")
    network_def = bundle_network_def(student.spec)
    weights = {k: v.detach().cpu() for k, v in student.network.state_dict().items()}

    # the network as the bundle's config builds it (its heads from fedbrats' copy of the file)
    here = bundle_network_def(student.spec, "fedbrats.common.networks.heads.with_population_heads")
    net = ConfigParser({"net": here, "population": population}).get_parsed_content("net")
    net.load_state_dict(weights, strict=True)
    net.eval()
    side = max(int(p) for p in student.patch_size)
    x = torch.randn(1, len(CONTRASTS), side, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(net(x), student.network(x), atol=1e-5):
            raise ExportError(f"{model}: the exported network does not reproduce the student")

    if out.exists() and overwrite:
        shutil.rmtree(out)
    for sub in ("configs", "models", "scripts", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in weights.items()},
               out / "models" / "model.pt")
    config = _inference_config(network_def, student.spacing, student.patch_size,
                               student.postprocess, population)
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = _metadata(student, network_def, model, population)
    (out / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("postprocessing.py"),
                    out / "scripts" / "postprocess.py")
    shutil.copyfile(Path(__file__).parents[1] / "networks" / "heads.py",
                    out / "scripts" / "heads.py")
    (out / "scripts" / "__init__.py").write_text("")
    plain = network_def.get("net", network_def)
    arguments = ", ".join(f"{k}={v}" for k, v in plain.items() if k != "_target_")
    if student.heads:
        arguments += (f"; one last block per population ({', '.join(student.heads)}), config "
                      "`population` picks one (null: their mean)")
    (out / "docs" / "README.md").write_text(_README.format(
        name=meta["name"], source=model.name, round=student.round, monai=meta["monai_version"],
        channels=", ".join(student.channels), spacing=" x ".join(map(str, student.spacing)),
        patch=" x ".join(map(str, student.patch_size)), cls=plain["_target_"],
        arguments=arguments, min_mm3=student.postprocess.min_component_mm3,
        et_mm3=student.postprocess.et_min_mm3,
    ))
    return out


def _run(args: argparse.Namespace) -> int:
    from fedbrats.common.inference.modelfile import ModelFileError

    try:
        out = export_bundle(args.model, args.out, args.population, args.overwrite)
    except (ExportError, ModelFileError) as e:
        print(f"error: {e}")
        return 2
    print(f"wrote the MONAI bundle {out} (configs/metadata.json, configs/inference.json, "
          "models/model.pt, scripts/postprocess.py); run it with:\n"
          f"  python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--bundle_root {out} --dataset_dir CASE_OR_SITE_DIR --output_dir PREDS")
    return 0


def register_export(subparsers) -> None:
    from fedbrats.common.data.contract import POPULATIONS

    p = subparsers.add_parser(
        "export",
        help="write a student as a MONAI bundle (runs with MONAI alone)",
        description=(
            "Write the student file --model as a MONAI bundle in --out: configs/metadata.json "
            "(channel order, label convention, regions, spacing, network and versions), "
            "configs/inference.json (fedbrats predict's steps in MONAI components), "
            "models/model.pt (the weights) and scripts/postprocess.py. Run it with "
            "`python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root "
            "OUT --dataset_dir CASE_DIR --output_dir PREDS` (MONAI with pytorch-ignite, "
            "nibabel, scipy; fedbrats is not needed). Exit 2 on a bad model file or an "
            "existing --out."
        ),
    )
    p.add_argument("--model", metavar="STUDENT", required=True, help="student file (student.pt)")
    p.add_argument("--out", metavar="DIR", required=True, help="bundle folder to write")
    p.add_argument("--population", metavar="POP", type=str.upper, choices=POPULATIONS,
                   default=None,
                   help="for a student with one head per population: the head to export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run)
