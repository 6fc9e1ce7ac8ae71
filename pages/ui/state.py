"""The chosen setting kept in `st.session_state`, the sidebar that edits it, the URL that mirrors it, and the
user-error guard.

The URL's query parameters and the sidebar are bound both ways: a link such as ``?task=digits-mlp&kind=naive&I=2``
opens that setting (values a link carries that cannot be used are named in a warning), and every run writes the
setting back as names and numbers that differ from `DEFAULTS`, so the address bar always reproduces the page.
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
from tda_core.settings import DEFAULTS, LIMITS, REAL_LIMITS, Setting, check_limits, make_setting, read_query
from tda_core.tasks import TASKS

from .present import kind_label, method_label, projection_label

URL = "query-params"  # widgets bound to the URL by Streamlit (plain-text values only, e.g. tab labels)


def init_state() -> None:
    """Once per session, take the setting values the URL gives (keeping what cannot be used for `sidebar` to
    name); then fill what is still missing with the defaults."""
    if "_initialised" not in st.session_state:
        st.session_state["_initialised"] = True
        values, st.session_state["_query_problems"] = read_query(st.query_params.to_dict())
        for key, value in values.items():
            st.session_state.setdefault(key, value)
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


def sync_url(values: dict[str, Any]) -> None:
    """Write `values` into the URL's query parameters (those equal to their default are left out)."""
    for key, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else (
            str(value))
        if key in DEFAULTS and value == DEFAULTS[key]:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != text:
            st.query_params[key] = text


def sidebar() -> None:
    """The setting editor shown on every page; its values persist across pages and are mirrored in the URL."""
    init_state()
    problems = st.session_state.pop("_query_problems", [])
    if problems:
        st.warning("This link carries values the app cannot use, so the sidebar shows defaults for them:\n\n"
                   + "\n".join(f"- {p}" for p in problems)
                   + "\n\n**Next step:** check the setting in the sidebar; every change updates the address bar, "
                     "so copy it from there to share this view.", icon=":material/link_off:")
    with st.sidebar:
        st.markdown("### Setting")
        st.selectbox("Task", sorted(TASKS), key="task", help="dataset + model + training recipe")
        st.selectbox("TDA method", METHODS.names(), key="method", format_func=method_label)
        st.selectbox("Ensemble", ENSEMBLES.names(), key="kind", format_func=kind_label)
        kind = ENSEMBLES.get(st.session_state["kind"])
        cols = st.columns(2)
        cols[0].number_input("I (trained)", *LIMITS["I"], key="I",
                             help=f"independently trained base models (the app runs up to {LIMITS['I'][1]})")
        if kind.budget:
            cols[1].number_input(f"{kind.budget} ({kind.budget_label.split()[-1]})", *LIMITS[kind.budget],
                                 key=kind.budget,
                                 help=f"{kind.budget_label} per base model (up to {LIMITS[kind.budget][1]})")
        with st.expander("Projection, damping, details"):
            st.selectbox("Projection", PROJECTIONS.names(), key="proj", format_func=projection_label,
                         help="Kronecker is the fast path; dense JL is the reference")
            st.number_input("Projection dimension", *LIMITS["proj_dim"], key="proj_dim",
                            help="projection dimension k (features per member)")
            st.number_input("Damping c", *REAL_LIMITS["damping"], key="damping", format="%g",
                            help="lambda = c * trace(K) / k")
            st.slider("Dropout rate (0 = the model's own)", *REAL_LIMITS["dropout_p"], key="dropout_p", step=0.05)
            st.number_input("LoRA rank", *LIMITS["lora_rank"], key="lora_rank")
            st.toggle("Members of a model share one projection", key="shared_projection",
                      help="Dropout / LoRA only: isolates the mask or adapter effect from projection noise")
            st.number_input("Seed", *LIMITS["seed"], key="seed")
    sync_url(current_values())


def current_values() -> dict[str, Any]:
    """The widget values of the current setting."""
    init_state()
    return {key: st.session_state[key] for key in DEFAULTS}


def current_setting() -> Setting:
    """The validated current setting (a bad combination or a value above the app's ceilings shows an error with
    the reason and stops the page)."""
    with friendly_errors("change the setting in the sidebar"):
        values = current_values()
        check_limits(values)
        return make_setting(values)


def select_setting(values: dict[str, Any]) -> None:
    """Make `values` (flat setting values, e.g. of a plotted result) the sidebar's setting. Call it from a widget
    callback, before the sidebar is drawn; the URL follows. Values above the app's ceilings raise a UserError."""
    check_limits(values)
    make_setting(values)
    for key, value in values.items():
        st.session_state[key] = value


@contextmanager
def friendly_errors(next_step: str = "check the setting in the sidebar (the message names the valid choices)"
                    ) -> Iterator[None]:
    """Show a UserError as a message with its next step and stop the page, never a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(f"{exc}\n\n**Next step:** {next_step}", icon=":material/error:")
        st.stop()
