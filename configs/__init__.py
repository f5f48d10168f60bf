"""The shipped recipes (package data only): this folder installs as `kumihimo.configs` (pyproject.toml's
package-dir mapping) and `kumihimo.core.recipes` finds a recipe here by name."""
