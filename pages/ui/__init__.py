"""The explorer's own code, beside its pages: shared state and sidebar (`state`), cached loaders (`cached`),
widgets (`widgets`), presentation helpers (`present`) and the guard that keeps pages inside app.py (`routing`).
Computations come from tda_core."""
