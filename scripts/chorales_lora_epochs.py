"""The LoRA fine-tuning length of the chorales ladder, chosen on the validation split, and what LoRA does to the model.

Usage: python -m scripts.chorales_lora_epochs [--epochs 1,2,3] [--damping-grid 0.1,1,...] [--out FILE.md]

For each fine-tuning length E: LoRA I = 1, L = 5 (rank 16) with TRAK and Grad-Dot (Kronecker, k = 2048), scored
against the ladder's ground truth (M = 50, R = 2); TRAK's damping tuned on the validation split. The length with the
highest TRAK LDS on the validation split (never the evaluation split) is the one the `chorales` grid uses
(`CHORALES_LORA_EPOCHS` in tda_core/experiments.py). Next to it: the test loss of the base model and of its five
LoRA members (`tda_core.ensembles.lora_test_losses`), and naive I = 1 on the same splits for reference.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from tda_core.cli.evaluation import damping_grid
from tda_core.ensembles import lora_test_losses
from tda_core.evaluation import ground_truth
from tda_core.experiments import CHORALES_LORA_EPOCHS, DAMPING_GRID, run
from tda_core.report import markdown
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
from tda_core.store import Store
from tda_core.tasks import get_task

EVAL = EvalSpec(M=50, runs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="1,2,3", help="comma-separated LoRA fine-tuning lengths (epochs)")
    parser.add_argument("--damping-grid", type=damping_grid, default=DAMPING_GRID)
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    args = parser.parse_args()
    task, store = get_task("chorales-mt"), Store()
    truth = ground_truth(task, EVAL, store=store, device="cpu")
    rows = []
    settings = [("naive I=1", EnsembleSpec("naive"))]
    settings += [(f"lora I=1 L=5, {e} epoch(s)", EnsembleSpec("lora", I=1, L=5, lora_epochs=e))
                 for e in (int(t) for t in args.epochs.split(","))]
    for label, ensemble in settings:
        row = {"setting": label}
        for name in ("trak", "grad-dot"):
            method = MethodSpec(name, proj="kron", damping=None)  # damping tuned on the validation split
            result = run(task, method, ensemble, EVAL, store=store, device="cpu", dampings=args.damping_grid,
                         truth=truth)
            tag = "TRAK" if name == "trak" else "Grad-Dot"
            row |= {f"{tag} validation LDS": result.validation.mean(), f"{tag} LDS": result.lds}
            if name == "trak":
                row["TRAK c"] = result.damping
        if ensemble.kind == "lora":
            losses = lora_test_losses(task, ensemble, store=store, device="cpu")
            members = losses[losses["adapter"] >= 0]["test_loss"]
            row |= {"base test loss": losses[losses["adapter"] < 0]["test_loss"].iloc[0],
                    "member test loss (mean)": members.mean(), "min": members.min(), "max": members.max()}
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    lora = table[table["setting"].str.startswith("lora")]
    best = lora.loc[lora["TRAK validation LDS"].idxmax(), "setting"]
    chosen = int(best.split(", ")[1].split()[0])
    note = (f"Highest TRAK LDS on the validation split: {best}; the `chorales` grid uses "
            f"{CHORALES_LORA_EPOCHS} epoch(s) ({'the same' if chosen == CHORALES_LORA_EPOCHS else 'NOT the same'}).")
    text = markdown(table) + "\n" + note + "\n"
    print(text)
    if args.out:
        command = "python -m scripts.chorales_lora_epochs " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.out).write_text("\n".join(["# chorales-mt: LoRA fine-tuning length", "", f"Made by `{command}` "
                                             f"(store: the ladder's, `TDA_STORE`).", "",
                                             __doc__.split("\n\n", 1)[1].strip(), "", text]))


if __name__ == "__main__":
    main()
