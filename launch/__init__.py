"""Launchers for remote machines (`python -m launch.tpu` for Cloud TPU VMs); stdlib only."""
