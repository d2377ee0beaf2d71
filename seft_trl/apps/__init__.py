"""Applications built on the library: the ``seft-trl`` command line, the recipes, the offline demo
and its assets. Nothing in the library imports from here.
"""
