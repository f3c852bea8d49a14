"""Generators of the reference pages in docs/ (run ``python -m tools.gen_docs``)."""
