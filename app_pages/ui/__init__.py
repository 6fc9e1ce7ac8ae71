"""The explorer's own code, beside its pages: shared state and sidebar (`state`), cached loaders (`cached`),
widgets (`widgets`) and presentation helpers (`present`). Computations come from tda_core."""
