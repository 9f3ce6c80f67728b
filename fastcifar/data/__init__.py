"""Data: source readers, the decoded-array cache, the validation split and loaders."""
