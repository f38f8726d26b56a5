"""The shipped recipes: installed as the package data of `toolkit.recipes` (see toolkit/catalog.py)."""
