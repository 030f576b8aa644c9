"""The repository: backends, the chunk codec, chunk lists, manifests and locks."""
