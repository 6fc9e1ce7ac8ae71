"""The chosen setting kept in `st.session_state`, the sidebar that edits it, and the user-error guard."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from tda_core.ensembles import ENSEMBLES
from tda_core.errors import UserError
from tda_core.methods import METHODS
from tda_core.projections import PROJECTIONS
from tda_core.settings import DEFAULT_TASK, DEFAULTS, LIMITS, Setting, make_setting, values_from_query
from tda_core.tasks import TASKS

from .present import kind_label, method_label, projection_label


def init_state() -> None:
    """Put the defaults, or values given in the URL, into st.session_state once per session."""
    if "_initialised" not in st.session_state:
        st.session_state["_initialised"] = True
        for key, value in values_from_query(st.query_params.to_dict()).items():
            st.session_state.setdefault(key, value)
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    if st.session_state["task"] not in TASKS:
        st.session_state["task"] = DEFAULT_TASK


def sidebar() -> None:
    """The setting editor shown on every page; its values persist across pages."""
    init_state()
    with st.sidebar:
        st.markdown("### Setting")
        st.selectbox("Task", sorted(TASKS), key="task", help="dataset + model + training recipe")
        st.selectbox("TDA method", METHODS.names(), key="method", format_func=method_label)
        st.selectbox("Ensemble", ENSEMBLES.names(), key="kind", format_func=kind_label)
        kind = ENSEMBLES.get(st.session_state["kind"])
        cols = st.columns(2)
        cols[0].number_input("I (trained)", *LIMITS["I"], key="I", help="independently trained base models")
        if kind.budget:
            cols[1].number_input(f"{kind.budget} ({kind.budget_label.split()[-1]})", *LIMITS[kind.budget],
                                 key=kind.budget, help=f"{kind.budget_label} per base model")
        with st.expander("Projection, damping, details"):
            st.selectbox("Projection", PROJECTIONS.names(), key="proj", format_func=projection_label,
                         help="Kronecker is the fast path; dense JL is the reference")
            st.number_input("Projection dimension", *LIMITS["proj_dim"], key="proj_dim",
                            help="projection dimension k (features per member)")
            st.number_input("Damping c", 0.0, 1000.0, key="damping", format="%g",
                            help="lambda = c * trace(K) / k")
            st.slider("Dropout rate (0 = the model's own)", 0.0, 0.9, key="dropout_p", step=0.05)
            st.number_input("LoRA rank", *LIMITS["lora_rank"], key="lora_rank")
            st.toggle("Members of a model share one projection", key="shared_projection",
                      help="Dropout / LoRA only: isolates the mask or adapter effect from projection noise")
            st.number_input("Seed", *LIMITS["seed"], key="seed")


def current_values() -> dict[str, Any]:
    """The widget values of the current setting."""
    init_state()
    return {key: st.session_state[key] for key in DEFAULTS}


def current_setting() -> Setting:
    """The validated current setting (a bad combination shows an error and stops the page)."""
    with friendly_errors():
        return make_setting(current_values())


@contextmanager
def friendly_errors(next_step: str = "") -> Iterator[None]:
    """Show a UserError as a message with its next step and stop the page, never a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(f"{exc}" + (f"\n\n**Next step:** {next_step}" if next_step else ""), icon=":material/error:")
        st.stop()
