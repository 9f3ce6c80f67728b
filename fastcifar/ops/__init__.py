"""Fused and native operators, each with a plain eager reference elsewhere in the package."""
