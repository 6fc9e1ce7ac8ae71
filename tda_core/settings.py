"""A setting (task, method, ensemble) as flat values and back, with readable labels.

The app's sidebar and its URLs hold a setting as flat values (``task=digits-mlp&kind=dropout&I=2&D=5``);
`make_setting` validates them into specs, `setting_values` turns specs back into values. Which ensemble
fields a kind uses comes from its registry entry, so equal settings always get equal specs (and store keys).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .ensembles import ENSEMBLES
from .methods import METHODS
from .projections import PROJECTIONS
from .specs import EnsembleSpec, MethodSpec, TaskSpec, ensemble_kind, method_record, projection_class
from .tasks import TASKS, get_task

DEFAULT_TASK = "mnist-mlp"
# value bounds of the numeric setting values (what a user may type or a URL may carry); the app refuses values
# outside them (the CLI takes the specs' own limits), M / runs bound the app's ground-truth inputs
LIMITS = {"I": (1, 50), "D": (1, 50), "L": (1, 50), "P": (1, 50), "proj_dim": (1, 65536), "seed": (0, 10_000),
          "lora_rank": (1, 256), "M": (2, 1000), "runs": (1, 10)}
# bounds of the real-valued setting values
REAL_LIMITS = {"damping": (0.0, 1000.0), "dropout_p": (0.0, 0.9)}
# flat key -> default value
DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK, "method": "trak", "proj": "kron", "proj_dim": 2048, "damping": 1.0,
    "kind": "dropout", "I": 1, "D": 5, "L": 5, "P": 5, "dropout_p": 0.0, "lora_rank": 16, "seed": 0,
    "shared_projection": False,
}
# flat keys that set an ensemble field of the kinds that use it (0 dropout rate = the model's own)
ENSEMBLE_VALUES = {"dropout_p": lambda v: float(v) if v else None, "lora_rank": int,
                   "shared_projection": bool}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One chosen setting: task, method and ensemble (hashable, so it can key caches)."""

    task: TaskSpec
    method: MethodSpec
    ensemble: EnsembleSpec

    @property
    def label(self) -> str:
        return describe(self.method, self.ensemble)


def describe_method(method: MethodSpec) -> str:
    """'TRAK, Kronecker JL k=32, c=1' and the like."""
    record = method_record(method.name)
    if not record.damped:
        return record.label
    proj = projection_class(method.proj).label + (f" k={method.proj_dim}" if method.proj != "none" else "")
    damping = "c tuned" if method.damping is None else f"c={method.damping:g}"
    return f"{record.label}, {proj}, {damping}"


def describe_ensemble(ensemble: EnsembleSpec) -> str:
    """'dropout I=2 D=5 (10 members, 2 trained)' and the like."""
    budget = ensemble_kind(ensemble.kind).budget
    size = f" {budget}={getattr(ensemble, budget)}" if budget else ""
    shared = ", shared projection" if ensemble.shared_projection else ""
    return (f"{ensemble.kind} I={ensemble.I}{size}{shared} ({ensemble.n_members} members, "
            f"{ensemble.n_trained} trained)")


def describe(method: MethodSpec, ensemble: EnsembleSpec) -> str:
    """A one-line label of a whole setting."""
    return f"{describe_method(method)} · {describe_ensemble(ensemble)}"


def make_setting(values: dict[str, Any]) -> Setting:
    """Build validated specs from flat values (missing keys take `DEFAULTS`); bad values raise UserError."""
    v = {**DEFAULTS, **values}
    task = get_task(v["task"])
    method = MethodSpec(name=v["method"], proj=v["proj"], proj_dim=int(v["proj_dim"]),
                        damping=None if v["damping"] is None else float(v["damping"]))
    kind = ensemble_kind(v["kind"])
    # only the fields of the chosen kind leave their defaults, so equal settings get equal store keys
    extra: dict[str, Any] = {kind.budget: int(v[kind.budget])} if kind.budget else {}
    extra |= {key: convert(v[key]) for key, convert in ENSEMBLE_VALUES.items() if key in kind.fields}
    ensemble = EnsembleSpec(kind=kind.name, I=int(v["I"]), seed=int(v["seed"]), **extra)
    return Setting(task, method, ensemble)


def check_limits(values: dict[str, Any]) -> None:
    """Refuse numeric setting values outside `LIMITS` / `REAL_LIMITS` with the reason (the app's ceilings)."""
    from .errors import UserError

    for key, value in values.items():
        bounds = LIMITS.get(key) or REAL_LIMITS.get(key)
        if bounds is None or value is None or isinstance(value, bool):
            continue
        low, high = bounds
        if not low <= value <= high:
            raise UserError(f"{key}={value:g} is outside what the app runs ({low:g} to {high:g}): the app keeps each "
                            "run within minutes on a laptop; run larger settings with `python -m tda_core run ...`")


def setting_values(setting: Setting) -> dict[str, Any]:
    """The flat values of a setting (the inverse of `make_setting` for the values it reads)."""
    m, e = setting.method, setting.ensemble
    values = {"task": setting.task.name, "method": m.name, "proj": m.proj, "proj_dim": m.proj_dim,
              "damping": m.damping, "kind": e.kind, "I": e.I, "seed": e.seed}
    kind = ensemble_kind(e.kind)
    if kind.budget:
        values[kind.budget] = getattr(e, kind.budget)
    for key in ENSEMBLE_VALUES:
        if key in kind.fields:
            value = getattr(e, key)
            values[key] = (value or 0.0) if key == "dropout_p" else value
    return values


def read_query(query: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Setting values given in a URL (``?task=digits-mlp&kind=naive&I=2``) and, for every setting value that
    cannot be used, one sentence saying why and what is valid. Keys that are not setting values are left alone."""
    choices = {"task": sorted(TASKS), "method": METHODS.names(), "kind": ENSEMBLES.names(), "proj": PROJECTIONS.names()}
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, text in query.items():
        text = str(text).strip()
        if key in choices:
            if text in choices[key]:
                out[key] = text
            else:
                problems.append(f"unknown {key} {text!r}; valid choices: {', '.join(choices[key])}")
        elif key in LIMITS or key in REAL_LIMITS:
            low, high = LIMITS.get(key) or REAL_LIMITS[key]
            try:
                value = int(text) if key in LIMITS else float(text)
            except ValueError:
                problems.append(f"{key}={text!r} is not a {'whole ' if key in LIMITS else ''}number; "
                                f"give one from {low:g} to {high:g}")
                continue
            if value < low:
                problems.append(f"{key}={text} is below the smallest value, {low:g}")
                continue
            if value > high:
                problems.append(f"{key}={text} is above the app's ceiling of {high:g} (larger runs belong on the "
                                "command line: `python -m tda_core ...`)")
                continue
            out[key] = value
        elif key == "shared_projection":
            if text.lower() in ("true", "false"):
                out[key] = text.lower() == "true"
            else:
                problems.append(f"shared_projection={text!r}: write true or false")
    return out, problems


def values_from_query(query: dict[str, str]) -> dict[str, Any]:
    """Setting values given in a URL (``?task=digits-mlp&kind=naive&I=2``); unknown or invalid ones are ignored."""
    return read_query(query)[0]


def values_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The flat setting values of a results-table row (task, method, projection, damping, ensemble and its budget),
    e.g. to open a plotted point's setting; values a row does not hold keep their `DEFAULTS`."""
    def given(value: Any) -> bool:
        return value is not None and not (isinstance(value, float) and value != value) and value != ""

    values: dict[str, Any] = {"task": str(row["task"]), "method": str(row["method"]), "proj": str(row["proj"]),
                              "kind": str(row["ensemble"]), "I": int(row["I"])}
    if given(row.get("proj_dim")):
        values["proj_dim"] = int(row["proj_dim"])
    if given(row.get("damping")) and method_record(values["method"]).damped:
        values["damping"] = float(row["damping"])
    budget = ensemble_kind(values["kind"]).budget
    if budget and given(row.get(budget)):
        values[budget] = int(row[budget])
    if given(row.get("shared_projection")):
        values["shared_projection"] = str(row["shared_projection"]).lower() == "true"
    return values


# --- a setting written as text: "kind=dropout,I=2,D=5" -------------------------------------------------------
METHOD_KEYS = {"method": "name", "proj": "proj", "proj_dim": "proj_dim", "proj_dtype": "proj_dtype",
               "dense_kind": "dense_kind", "proj_seed": "seed", "damping": "damping", "hessian": "hessian"}
ENSEMBLE_KEYS = {"kind": "kind", "I": "I", "D": "D", "L": "L", "P": "P", "dropout_p": "dropout_p", "masks": "masks",
                 "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "lora_epochs": "lora_epochs",
                 "lora_lr": "lora_lr", "lora_grad": "lora_grad", "shared_projection": "shared_projection",
                 "forward_grad": "forward_grad", "seed": "seed"}


def _convert(text: str, field: dataclasses.Field, key: str) -> Any:
    from .errors import UserError

    if key == "damping" and text in ("tuned", "none", "None"):
        return None
    if key == "dropout_p" and text in ("none", "None"):
        return None
    kind = str(field.type)
    try:
        if "bool" in kind:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if "int" in kind and "float" not in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise UserError(f"cannot read {key}={text!r}: expected {kind.replace(' | None', '')}") from None
    return text


def parse_setting(text: str, method: MethodSpec | None = None,
                  ensemble: EnsembleSpec | None = None) -> tuple[MethodSpec, EnsembleSpec]:
    """(method, ensemble) from 'key=value' pairs separated by commas, e.g. 'kind=dropout,I=2,D=5' or
    'method=grad-dot,proj=dense'; keys not given keep `method` / `ensemble` (default: TRAK, Kronecker, damping
    tuned; naive I = 1). Unknown keys raise a UserError listing the valid ones."""
    from .errors import UserError

    method = method or MethodSpec(proj="kron", damping=None)
    ensemble = ensemble or EnsembleSpec()
    m_fields = {f.name: f for f in dataclasses.fields(MethodSpec)}
    e_fields = {f.name: f for f in dataclasses.fields(EnsembleSpec)}
    m_values, e_values = {}, {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise UserError(f"cannot read {part!r} in setting {text!r}: write key=value pairs, e.g. kind=dropout,I=2,D=5")
        if key in METHOD_KEYS:
            name = METHOD_KEYS[key]
            m_values[name] = _convert(value, m_fields[name], key)
        elif key in ENSEMBLE_KEYS or key == "ensemble":
            name = ENSEMBLE_KEYS.get(key, "kind")
            e_values[name] = _convert(value, e_fields[name], key)
        else:
            raise UserError(f"unknown setting key {key!r}; valid keys: "
                            f"{', '.join([*METHOD_KEYS, *ENSEMBLE_KEYS])}")
    return dataclasses.replace(method, **m_values), dataclasses.replace(ensemble, **e_values)
