"""Capacity planning: hours and cost per stage for a dataset, a model and a cluster."""
