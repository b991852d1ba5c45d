"""Recipes: the typed schema and shipped YAML files."""
