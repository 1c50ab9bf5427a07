"""Command bodies that are more than a call: ``debias explain`` on a finished train run."""
from __future__ import annotations

from pathlib import Path

import torch

from . import io
from .concepts import build_concepts
from .data import load_dataset
from .errors import DebiasError
from .explain import compute_matching, explain_model, probe_split
from .models.clip import load_clip
from .models.standalone import StandaloneModel, load_fitting_weights
from .recipe import Recipe, load_recipe
from .train.loop import resolve_device, seed_everything


def load_standalone_weights(model: StandaloneModel, run_dir: Path, recipe: Recipe, class_names: list[str],
                            filename: str = "model.safetensors") -> None:
    """Load a run's weights, refusing a checkpoint of another model or class list with a message naming it."""
    path = run_dir / filename
    if not path.is_file():
        raise DebiasError(f"--checkpoint {str(run_dir)!r}: no {filename} there; expected a `debias train` run directory")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise DebiasError(f"{path}: not a readable safetensors checkpoint ({str(exc).splitlines()[0][:200]})") from None
    load_fitting_weights(model, io.load_tensors(path), meta, recipe.model.name, class_names, path)


def explain_run(recipe_path: str, overrides: list[str], run_dir: Path, out: Path, progress: bool = True) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    from .preflight import check_inputs

    check_inputs(recipe, model_weights=False)
    if not run_dir.is_dir():
        raise DebiasError(f"--checkpoint {str(run_dir)!r}: not a directory; expected a `debias train` run directory")
    if (out / "metrics.json").exists():  # its concept_scores.png belongs to that run's metrics
        raise DebiasError(f"--out {str(out)!r} is a `debias train` run directory (it holds metrics.json); give the "
                          "explanation a folder of its own")
    device = resolve_device(recipe.train.device)
    seed_everything(recipe.seed)
    bundle = load_dataset(recipe)
    model = StandaloneModel(recipe.model.name, bundle.num_classes).to(device)
    load_standalone_weights(model, run_dir, recipe, bundle.class_names)
    model.eval()
    io.check_writable(out)
    clip = load_clip(recipe.clip, device)
    split = bundle.splits.get(recipe.explain.split)
    if split is None:
        raise DebiasError(f"explain.split = {recipe.explain.split!r}: not a split; splits: {sorted(bundle.splits)}")
    with torch.no_grad():
        matching = compute_matching(model, clip, probe_split(recipe, bundle), recipe, device, progress)
    explanation = explain_model(model, clip, matching, recipe, split, build_concepts(recipe, bundle), device, progress)
    io.atomic_write_json(out / "explain.json", explanation)
    from .report import plot_concept_scores

    plot_concept_scores(explanation, out / "concept_scores.png", title=f"{recipe.model.name} from {run_dir}")
    from .explain import summary_lines

    for line in summary_lines(explanation):
        print(line)
    print(f"wrote {out / 'explain.json'}")
    return explanation
