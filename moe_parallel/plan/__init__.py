"""Planning a run before it starts: parameter counts and training FLOPs (memory per layout and
the layout search are not written yet)."""
