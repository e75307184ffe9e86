"""Shared plumbing of every stage: errors, the command-line wrapper, atomic files, manifests, progress, code inputs."""
