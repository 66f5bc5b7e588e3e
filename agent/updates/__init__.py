"""Over-the-air model updates: signed manifests, resumable downloads, the model store, the updater."""
