"""The chosen setting kept in `st.session_state`, the sidebar that edits it, and the user-error guard.

The sidebar's widgets are bound to the URL's query parameters (Streamlit's `bind="query-params"`), both ways:
a link such as ``?task=digits-mlp&kind=naive&I=2`` opens that setting, and every change is written back, so the
address bar always reproduces the page (values equal to `DEFAULTS` are left out). Values a link carries that
cannot be used are named in a warning.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from tda_core.ensembles import ENSEMBLES
from tda_core.errors import UserError
from tda_core.methods import METHODS
from tda_core.projections import PROJECTIONS
from tda_core.settings import (DEFAULTS, LIMITS, REAL_LIMITS, Setting, check_limits, make_setting,
                               read_query)
from tda_core.tasks import TASKS

from .present import kind_label, method_label, projection_label

URL = "query-params"  # widgets bound to the URL


def init_state() -> None:
    """Once per session, check what the URL gives (the bound widgets read it themselves) and keep what cannot be
    used for `sidebar` to name."""
    if "_initialised" not in st.session_state:
        st.session_state["_initialised"] = True
        st.session_state["_query_problems"] = read_query(st.query_params.to_dict())[1]


def _index(options, key: str) -> int:  # noqa: ANN001
    return list(options).index(DEFAULTS[key])


def sidebar() -> None:
    """The setting editor shown on every page; its values persist across pages and live in the URL."""
    init_state()
    problems = st.session_state.pop("_query_problems", [])
    if problems:
        st.warning("This link carries values the app cannot use, so the sidebar shows defaults for them:\n\n"
                   + "\n".join(f"- {p}" for p in problems)
                   + "\n\n**Next step:** check the setting in the sidebar; every change updates the address bar, "
                     "so copy it from there to share this view.", icon=":material/link_off:")
    with st.sidebar:
        st.markdown("### Setting")
        st.selectbox("Task", sorted(TASKS), _index(sorted(TASKS), "task"), key="task", bind=URL,
                     help="dataset + model + training recipe")
        st.selectbox("TDA method", METHODS.names(), _index(METHODS.names(), "method"), key="method",
                     format_func=method_label, bind=URL)
        st.selectbox("Ensemble", ENSEMBLES.names(), _index(ENSEMBLES.names(), "kind"), key="kind",
                     format_func=kind_label, bind=URL)
        kind = ENSEMBLES.get(st.session_state["kind"])
        cols = st.columns(2)
        cols[0].number_input("I (trained)", *LIMITS["I"], DEFAULTS["I"], key="I", bind=URL,
                             help=f"independently trained base models (the app runs up to {LIMITS['I'][1]})")
        if kind.budget:
            cols[1].number_input(f"{kind.budget} ({kind.budget_label.split()[-1]})", *LIMITS[kind.budget],
                                 DEFAULTS[kind.budget], key=kind.budget, bind=URL,
                                 help=f"{kind.budget_label} per base model (up to {LIMITS[kind.budget][1]})")
        with st.expander("Projection, damping, details"):
            st.selectbox("Projection", PROJECTIONS.names(), _index(PROJECTIONS.names(), "proj"), key="proj",
                         format_func=projection_label, bind=URL,
                         help="Kronecker is the fast path; dense JL is the reference")
            st.number_input("Projection dimension", *LIMITS["proj_dim"], DEFAULTS["proj_dim"], key="proj_dim",
                            bind=URL, help="projection dimension k (features per member)")
            st.number_input("Damping c", *REAL_LIMITS["damping"], DEFAULTS["damping"], key="damping", format="%g",
                            bind=URL, help="lambda = c * trace(K) / k")
            st.slider("Dropout rate (0 = the model's own)", *REAL_LIMITS["dropout_p"], DEFAULTS["dropout_p"],
                      key="dropout_p", step=0.05, bind=URL)
            st.number_input("LoRA rank", *LIMITS["lora_rank"], DEFAULTS["lora_rank"], key="lora_rank", bind=URL)
            st.toggle("Members of a model share one projection", DEFAULTS["shared_projection"],
                      key="shared_projection", bind=URL,
                      help="Dropout / LoRA only: isolates the mask or adapter effect from projection noise")
            st.number_input("Seed", *LIMITS["seed"], DEFAULTS["seed"], key="seed", bind=URL)


def current_values() -> dict[str, Any]:
    """The widget values of the current setting."""
    init_state()
    return {key: st.session_state.get(key, value) for key, value in DEFAULTS.items()}


def current_setting() -> Setting:
    """The validated current setting (a bad combination or a value above the app's ceilings shows an error with
    the reason and stops the page)."""
    with friendly_errors("change the setting in the sidebar"):
        values = current_values()
        check_limits(values)
        return make_setting(values)


def select_setting(values: dict[str, Any]) -> None:
    """Make `values` (flat setting values, e.g. of a plotted result) the sidebar's setting. Call it from a widget
    callback, before the sidebar is drawn; the URL follows."""
    for key, value in values.items():
        st.session_state[key] = value


@contextmanager
def friendly_errors(next_step: str = "") -> Iterator[None]:
    """Show a UserError as a message with its next step and stop the page, never a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(f"{exc}" + (f"\n\n**Next step:** {next_step}" if next_step else ""), icon=":material/error:")
        st.stop()
