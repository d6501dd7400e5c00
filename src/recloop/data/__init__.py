"""Loading, preparing and sampling logged user behaviour."""
